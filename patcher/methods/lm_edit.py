"""The machinery MEMIT and AlphaEdit share: requests, keys, target values, layer spread.

Both methods rewrite the MLP down-projections of a few layers so that, at the last token
of each forget fact's subject, the residual stream carries a value that no longer leads to
the target. They differ only in how one layer's update is solved from the keys K and the
residuals R; that solve is the `LayerSolver` each method supplies.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.adapters import CausalLMAdapter
from patcher.adapters.base import per_token
from patcher.errors import PatcherError, quoted
from patcher.models import trainable_only
from patcher.progress import progress
from patcher.scoring import target_leads
from patcher.spec import ForgetFact, infer_subject
from patcher.tokens import encode_prompt, encode_target, leading_special_tokens, pad_id, right_padded

# (layer, keys (d_k, n), residuals (d_model, n)) -> update (d_model, d_k), all float64.
LayerSolver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TargetHparams:
    """How the target value of each fact is searched (MEMIT's `v_*` settings)."""

    steps: int = 30
    lr: float = 0.5
    kl_factor: float = 0.0625
    weight_decay: float = 1e-3
    clamp_norm: float = 4.0
    context_templates: int = 6
    stop_probability: float = 0.01
    margin: float = 0.0  # searched until, in every context, some target token trails another by this many nats


@dataclass
class EditRequest:
    """One forget fact, tokenized: where its subject ends and what must not follow."""

    prompt_ids: list[int]
    essence_ids: list[int]  # "<subject> is a": what the KL term keeps unchanged
    subject_end: int  # index of the subject's last token in prompt_ids
    target_ids: list[int]
    replacement_ids: list[int] | None


def build_request(tokenizer, fact: ForgetFact) -> EditRequest:
    """Tokenize a forget fact and locate its subject's last token."""
    subject = infer_subject(fact)
    start = fact.prompt.find(subject)
    if start < 0:
        raise PatcherError(f"the subject {quoted(subject)} does not occur in the prompt {quoted(fact.prompt)}")
    prompt_ids = encode_prompt(tokenizer, fact.prompt)
    subject_end = len(encode_prompt(tokenizer, fact.prompt[: start + len(subject)])) - 1
    essence_ids = _essence_prompt(tokenizer, subject)
    replacement = encode_target(tokenizer, fact.replacement) if fact.replacement else None
    return EditRequest(prompt_ids, essence_ids, subject_end, encode_target(tokenizer, fact.target), replacement)


def _essence_prompt(tokenizer, subject: str) -> list[int]:
    """MEMIT's "<subject> is a", or the bare subject where the vocabulary lacks those words."""
    try:
        return encode_prompt(tokenizer, f"{subject} is a")
    except PatcherError:
        return encode_prompt(tokenizer, subject)


@torch.no_grad()
def sample_context_prefixes(model, tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """Short token prefixes sampled from the model itself, as MEMIT does, plus the empty one.

    Keys and target values are averaged over these contexts so the edit holds wherever the
    fact appears, not only at the start of a text.
    """
    generator = torch.Generator().manual_seed(seed)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    period = tokenizer(" .", add_special_tokens=False).input_ids
    period = [] if tokenizer.unk_token_id in period else period
    prefixes: list[list[int]] = [[]]
    device = next(model.parameters()).device
    for i in range(count):
        ids = torch.tensor([[start]], device=device)
        for _ in range(5 if i % 2 == 0 else 10):
            probs = model(input_ids=ids).logits[0, -1].float().softmax(-1).cpu()
            top = probs.topk(min(10, probs.numel()))
            pick = top.indices[torch.multinomial(top.values, 1, generator=generator)]
            ids = torch.cat([ids, pick.view(1, 1).to(device)], dim=1)
        prefixes.append(ids[0, 1:].tolist() + period)
    return prefixes


def in_context(request: EditRequest, prefix: list[int], n_special: int) -> tuple[list[int], int]:
    """The prompt with `prefix` inserted after its special tokens; the shifted subject index."""
    ids = request.prompt_ids[:n_special] + prefix + request.prompt_ids[n_special:]
    return ids, request.subject_end + len(prefix)


@contextmanager
def _hook(module: torch.nn.Module, hook, pre: bool = False):
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _run(model, sequences: list[list[int]], pad: int):
    ids, mask = right_padded(sequences, pad)
    device = next(model.parameters()).device
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits


class _Captured(Exception):
    """Raised by a capture hook: nothing after the captured module needs to run."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


@torch.no_grad()
def _captured_at(
    model, module: torch.nn.Module, pre: bool, sequences: list[list[int]], positions: list[int], pad: int
) -> torch.Tensor:
    """The input (`pre`) or output of `module` at one position per sequence: (width, n).

    The forward pass stops at `module`, and runs 64 sequences at a time.
    """

    def capture(module, args, output=None):
        raise _Captured(args[0] if pre else _hidden(output))

    columns = []
    with _hook(module, capture, pre=pre):
        for start in range(0, len(sequences), 64):
            chunk = sequences[start : start + 64]
            try:
                _run(model, chunk, pad)
            except _Captured as captured:
                rows = torch.arange(len(chunk))
                value = per_token(captured.value, len(chunk))
                columns.append(value[rows, torch.tensor(positions[start : start + 64])])
    return torch.cat(columns).double().T.cpu()


def values_at(
    adapter: CausalLMAdapter, layer: int, sequences: list[list[int]], positions: list[int], pad: int
) -> torch.Tensor:
    """The value `layer`'s edit targets at one position per sequence, (d_model, n): the
    residual stream after the layer, or the projection's output where a norm follows it."""
    return _captured_at(adapter.model, adapter.value_site(layer), False, sequences, positions, pad)


def average_keys(
    adapter: CausalLMAdapter,
    layer: int,
    requests: list[EditRequest],
    prefixes: list[list[int]],
    n_special: int,
    pad: int,
) -> torch.Tensor:
    """Each request's key (the down-projection's input) at its subject, averaged over the
    context prefixes: (d_k, n)."""
    placed = [in_context(request, p, n_special) for request in requests for p in prefixes]
    sequences, positions = [ids for ids, _ in placed], [i for _, i in placed]
    keys = _captured_at(adapter.model, adapter.down_proj(layer), True, sequences, positions, pad)
    return keys.view(keys.shape[0], len(requests), len(prefixes)).mean(dim=2)


@dataclass
class _SearchBatch:
    """Some facts' sequences in one padded batch: one per context prefix, then each KL prompt."""

    sequences: list[list[int]]
    owners: torch.Tensor  # the fact (index into the batch's facts) each row belongs to
    shift_positions: torch.Tensor  # where each row's δ is added (the subject's last token)
    answer_rows: torch.Tensor  # one entry per scored answer token: its row, ...
    answer_positions: torch.Tensor  # ... its position, ...
    answer_tokens: torch.Tensor  # ... the token scored there ...
    answer_owners: torch.Tensor  # ... and its fact
    kl_rows: torch.Tensor  # one KL prompt per fact, in fact order
    kl_positions: torch.Tensor

    @classmethod
    def build(cls, requests: list[EditRequest], prefixes: list[list[int]], n_special: int) -> _SearchBatch:
        sequences, owners, shifts = [], [], []
        answer_rows, answer_positions, answer_tokens, answer_owners = [], [], [], []
        for fact, request in enumerate(requests):
            answer = request.replacement_ids or request.target_ids
            for prefix in prefixes:
                ids, subject = in_context(request, prefix, n_special)
                for t, token in enumerate(answer):
                    answer_rows.append(len(sequences))
                    answer_positions.append(len(ids) - 1 + t)
                    answer_tokens.append(token)
                    answer_owners.append(fact)
                sequences.append(ids + answer[:-1])
                owners.append(fact)
                shifts.append(subject)
        kl_rows = list(range(len(sequences), len(sequences) + len(requests)))
        kl_positions = [len(r.essence_ids) - 1 for r in requests]
        sequences += [r.essence_ids for r in requests]
        owners += range(len(requests))
        shifts += kl_positions
        as_tensors = map(torch.tensor, (owners, shifts, answer_rows, answer_positions, answer_tokens, answer_owners))
        return cls(sequences, *as_tensors, torch.tensor(kl_rows), torch.tensor(kl_positions))


def target_values(
    adapter: CausalLMAdapter,
    layer: int,
    requests: list[EditRequest],
    prefixes: list[list[int]],
    n_special: int,
    pad: int,
    hp: TargetHparams,
    rows_per_pass: int = 32,
) -> torch.Tensor:
    """Each request's value at `layer` (`values_at`) at its subject that makes its target
    unlikely: (d_model, n).

    Optimises one additive shift δ per fact over every context: unlikelihood of each target
    token, -log(1 - p), or likelihood of the replacement when the fact names one; a KL term
    keeps what follows "<subject> is a"; δ is clamped to `clamp_norm` x the original norm.
    Returns the bare prompt's original value plus δ.

    Facts are searched side by side, about `rows_per_pass` sequences per forward pass; a
    fact leaves the batch when it reaches its stopping point and the next one takes its
    place. Each fact's loss depends only on its own δ, and Adam keeps a separate state per
    tensor, so every fact follows the path it would follow searched alone.
    """
    model = adapter.model
    bare = [in_context(r, prefixes[0], n_special) for r in requests]
    original = values_at(adapter, layer, [ids for ids, _ in bare], [pos for _, pos in bare], pad).T.float()
    with torch.no_grad():
        essence = _SearchBatch.build(requests, [], n_special)
        base_kl = F.log_softmax(_run(model, essence.sequences, pad)[essence.kl_rows, essence.kl_positions].float(), -1)
    deltas = [torch.zeros_like(value, requires_grad=True) for value in original]
    optimizer = torch.optim.Adam(deltas, lr=hp.lr)
    max_norms = hp.clamp_norm * original.norm(dim=1)
    steps_taken = [0] * len(requests)
    width = max(1, rows_per_pass // (len(prefixes) + 1))
    waiting, active = list(range(len(requests))), []
    finished = progress(range(len(requests)), "targets")  # advanced once per fact that leaves
    with trainable_only(model):
        while waiting or active:
            active += [waiting.pop(0) for _ in range(min(width - len(active), len(waiting)))]
            batch = _SearchBatch.build([requests[i] for i in active], prefixes, n_special)
            shift = torch.stack([deltas[i] for i in active])
            edit_loss, done, kl_log_probs = _search_step(adapter, layer, batch, shift, requests, active, pad, hp)
            kl = F.kl_div(kl_log_probs, base_kl[active], log_target=True, reduction="none").sum(-1)
            decay = hp.weight_decay * shift.norm(dim=1) ** 2 / original[active].norm(dim=1) ** 2
            moving = [i for i, is_done in zip(active, done.tolist(), strict=True) if not is_done]
            optimizer.zero_grad(set_to_none=True)
            if moving:
                ((edit_loss + hp.kl_factor * kl + decay) * ~done).sum().backward()
                for i in set(active) - set(moving):
                    deltas[i].grad = None  # Adam skips a tensor without a gradient
                optimizer.step()
            with torch.no_grad():
                for i in moving:
                    deltas[i].mul_((max_norms[i] / deltas[i].norm()).clamp(max=1))
                    steps_taken[i] += 1
            still = [i for i in moving if steps_taken[i] < hp.steps]
            for _ in range(len(active) - len(still)):
                next(finished, None)
            active = still
    return (original + torch.stack(deltas).detach()).double().T


def _search_step(adapter, layer, batch, shift, requests, active, pad, hp):
    """One forward pass of the target search: each fact's edit loss, whether it is done,
    and the log-probabilities after its KL prompt."""
    n = len(active)
    replaces = torch.tensor([requests[i].replacement_ids is not None for i in active])
    rows = torch.arange(len(batch.sequences))

    def add_shift(module, args, output):
        hidden = per_token(_hidden(output), len(rows)).clone()
        hidden[rows, batch.shift_positions] += shift[batch.owners].to(hidden.dtype)
        return _with_hidden(output, hidden.view_as(_hidden(output)))

    with _hook(adapter.value_site(layer), add_shift):
        logits = _run(adapter.model, batch.sequences, pad).float()
    log_probs = F.log_softmax(logits[batch.answer_rows, batch.answer_positions], -1)
    token_log_probs = log_probs.gather(1, batch.answer_tokens.view(-1, 1)).squeeze(1)
    probs = token_log_probs.exp()
    unlikely = -torch.log1p(-probs.clamp(max=1 - 1e-6))
    token_loss = torch.where(replaces[batch.answer_owners], -token_log_probs, unlikely)
    counts = torch.zeros(n).index_add_(0, batch.answer_owners, torch.ones(len(token_loss)))
    edit_loss = torch.zeros(n).index_add(0, batch.answer_owners, token_loss) / counts
    highest = torch.zeros(n).scatter_reduce(0, batch.answer_owners, probs.detach(), "amax", include_self=False)
    # A model whose next-token distribution is flat (Cohere's logit scale, a random
    # initialisation) can still rank the target first below the stop probability, or a hair
    # behind the first, where erase's check (some target token trails by the margin) still
    # counts the fact answered: in every context, some token must trail by the margin.
    others = log_probs.detach().scatter(1, batch.answer_tokens.view(-1, 1), -torch.inf).amax(-1)
    gap = token_log_probs.detach() - others
    leading = torch.zeros(n).index_add_(0, batch.answer_owners, (gap > 0).float()) > 0
    row_trails = torch.zeros(len(batch.sequences)).index_add_(0, batch.answer_rows, (gap <= -hp.margin).float()) > 0
    answered_rows = batch.answer_rows.unique()
    untrailed = torch.zeros(n).index_add_(0, batch.owners[answered_rows], (~row_trails[answered_rows]).float())
    erased = (highest < hp.stop_probability) & ~leading & (untrailed == 0)
    done = torch.where(replaces, edit_loss.detach() < 0.05, erased)
    return edit_loss, done, F.log_softmax(logits[batch.kl_rows, batch.kl_positions], -1)


def still_answered(model, requests: list[EditRequest], pad: int, margin: float = 0.0) -> list[bool]:
    """Whether greedy decoding still reproduces each request's full target, or would after a
    logit shift of `margin` nats in the target's favour (an erasure without that margin can
    come back in a format whose arithmetic differs)."""
    leads = target_leads(model, [(r.prompt_ids, r.target_ids) for r in requests], pad)
    return [lead > -margin for lead in leads]


def require_facts(facts: list[ForgetFact]) -> None:
    """A one-line error for a spec with nothing to erase."""
    if not facts:
        raise PatcherError("the spec has no [[forget]] facts: add at least one fact to erase")


def edit_layers(
    adapter: CausalLMAdapter,
    tokenizer,
    facts: list[ForgetFact],
    layers: list[int],
    solve: LayerSolver,
    hp: TargetHparams,
) -> dict[str, torch.Tensor]:
    """Compute the down-projection updates of `layers` that erase `facts`.

    MEMIT's schedule: target values at the last edited layer; then, layer by layer from
    the first, keys at the subject and the remaining residual divided by the number of
    layers still to edit. Where a norm maps the projection's output (`value_site`), layers
    do not add into one stream, so each layer searches its own target values, on the
    model as the earlier layers' updates left it. Returns param name -> delta in the
    parameter's layout; the model's weights are restored before returning.
    """
    require_facts(facts)
    if max(layers) >= adapter.num_layers:
        raise PatcherError(f"layer {max(layers)} does not exist: the model has {adapter.num_layers} layers")
    model, pad = adapter.model, pad_id(tokenizer)
    n_special = leading_special_tokens(tokenizer)
    requests = [build_request(tokenizer, fact) for fact in facts]
    prefixes = sample_context_prefixes(model, tokenizer, hp.context_templates)

    def targets_at(layer: int) -> torch.Tensor:
        return target_values(adapter, layer, requests, prefixes, n_special, pad, hp)

    shared_targets = None if adapter.output_normalised else targets_at(layers[-1])
    originals = {layer: adapter.down_proj(layer).weight.detach().clone() for layer in layers}
    deltas: dict[str, torch.Tensor] = {}
    try:
        for i, layer in enumerate(layers):
            keys = average_keys(adapter, layer, requests, prefixes, n_special, pad)
            at = layers[-1] if shared_targets is not None else layer
            targets = shared_targets if shared_targets is not None else targets_at(layer)
            current = values_at(adapter, at, [r.prompt_ids for r in requests], [r.subject_end for r in requests], pad)
            residuals = (targets - current) / (len(layers) - i)
            update = adapter.to_param_layout(solve(layer, keys, residuals))
            weight = adapter.down_proj(layer).weight
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
            deltas[adapter.weight_name(layer)] = update.float()
    finally:
        with torch.no_grad():
            for layer, weight in originals.items():
                adapter.down_proj(layer).weight.copy_(weight)
    return deltas


def accumulate(total: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add `deltas` into `total` in place (param name -> delta) and return it."""
    for name, delta in deltas.items():
        total[name] = total[name] + delta if name in total else delta
    return total


@contextmanager
def deltas_applied(model: torch.nn.Module, deltas: dict[str, torch.Tensor]):
    """Temporarily add `deltas` (param name -> delta) to the model's weights."""
    params = dict(model.named_parameters())
    originals = {name: params[name].detach().clone() for name in deltas}
    with torch.no_grad():
        for name, delta in deltas.items():
            params[name].add_(delta.to(params[name].dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, original in originals.items():
                params[name].copy_(original)


def auto_layers(num_layers: int) -> list[int]:
    """Early-middle layers, where MEMIT-style edits of subject recall work best."""
    first = round(num_layers * 0.12)
    last = max(first + 1, round(num_layers * 0.28))
    return list(range(first, min(last, num_layers - 1) + 1))
