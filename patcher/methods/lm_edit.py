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
from patcher.errors import PatcherError
from patcher.progress import progress
from patcher.scoring import target_leads
from patcher.spec import ForgetFact
from patcher.tokens import encode_prompt, encode_target, pad_id, right_padded

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

    @classmethod
    def from_spec(cls, hparams: dict) -> TargetHparams:
        """Defaults, overridden by the spec's [erase] keys of the same names."""
        names = ("steps", "lr", "kl_factor", "clamp_norm", "context_templates")
        return cls(**{k: type(getattr(cls, k))(v) for k, v in hparams.items() if k in names})


@dataclass
class EditRequest:
    """One forget fact, tokenized: where its subject ends and what must not follow."""

    prompt_ids: list[int]
    essence_ids: list[int]  # "<subject> is a": what the KL term keeps unchanged
    subject_end: int  # index of the subject's last token in prompt_ids
    target_ids: list[int]
    replacement_ids: list[int] | None


def infer_subject(fact: ForgetFact) -> str:
    """The fact's subject: given, or the longest word run the prompt shares with a paraphrase."""
    if fact.subject:
        return fact.subject
    if not fact.paraphrases:
        raise PatcherError(
            f"forget fact {fact.prompt!r} names no subject and has no paraphrase to infer one "
            'from: add subject = "..." to it'
        )
    words, other = fact.prompt.split(), fact.paraphrases[0].split()
    best: list[str] = []
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            run = words[i:j]
            if len(run) > len(best) and _contains(other, run):
                best = run
    if not best:
        raise PatcherError(f'cannot infer the subject of {fact.prompt!r}: add subject = "..." to it')
    return " ".join(best)


def _contains(words: list[str], run: list[str]) -> bool:
    return any(words[k : k + len(run)] == run for k in range(len(words) - len(run) + 1))


def build_request(tokenizer, fact: ForgetFact) -> EditRequest:
    """Tokenize a forget fact and locate its subject's last token."""
    subject = infer_subject(fact)
    start = fact.prompt.find(subject)
    if start < 0:
        raise PatcherError(f"the subject {subject!r} does not occur in the prompt {fact.prompt!r}")
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


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before any text."""
    return len(tokenizer("").input_ids)


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


@torch.no_grad()
def layer_outputs_at(
    adapter: CausalLMAdapter, layer: int, sequences: list[list[int]], positions: list[int], pad: int
) -> torch.Tensor:
    """The residual stream after `layer` at one position per sequence: (d_model, n)."""
    captured = {}

    def capture(module, args, output):
        captured["h"] = _hidden(output)

    with _hook(adapter.layers[layer], capture):
        _run(adapter.model, sequences, pad)
    rows = torch.arange(len(sequences))
    return captured["h"][rows, torch.tensor(positions)].double().T.cpu()


@torch.no_grad()
def keys_at(
    adapter: CausalLMAdapter, layer: int, sequences: list[list[int]], positions: list[int], pad: int
) -> torch.Tensor:
    """The down-projection input at one position per sequence: (d_k, n)."""
    captured = {}

    def capture(module, args):
        captured["k"] = args[0]

    with _hook(adapter.down_proj(layer), capture, pre=True):
        _run(adapter.model, sequences, pad)
    rows = torch.arange(len(sequences))
    return captured["k"][rows, torch.tensor(positions)].double().T.cpu()


def average_keys(
    adapter: CausalLMAdapter,
    layer: int,
    requests: list[EditRequest],
    prefixes: list[list[int]],
    n_special: int,
    pad: int,
) -> torch.Tensor:
    """Each request's key at its subject, averaged over the context prefixes: (d_k, n)."""
    columns = []
    for request in requests:
        placed = [in_context(request, p, n_special) for p in prefixes]
        keys = keys_at(adapter, layer, [s for s, _ in placed], [i for _, i in placed], pad)
        columns.append(keys.mean(dim=1))
    return torch.stack(columns, dim=1)


def target_value(
    adapter: CausalLMAdapter,
    layer: int,
    request: EditRequest,
    prefixes: list[list[int]],
    n_special: int,
    pad: int,
    hp: TargetHparams,
) -> torch.Tensor:
    """The residual value after `layer` at the subject that makes the target unlikely.

    Optimises an additive shift δ of that residual over every context: unlikelihood of each
    target token, -log(1 - p), or likelihood of the replacement when the fact names one; a
    KL term keeps what follows "<subject> is a"; δ is clamped to `clamp_norm` x the
    original norm. Returns the bare prompt's original value plus δ: (d_model,).
    """
    model = adapter.model
    answer = request.replacement_ids or request.target_ids
    placed = [in_context(request, p, n_special) for p in prefixes]
    sequences = [ids + answer[:-1] for ids, _ in placed]
    subject_positions = [pos for _, pos in placed]
    answer_positions = [len(ids) - 1 + t for ids, _ in placed for t in range(len(answer))]
    answer_rows = [row for row, _ in enumerate(placed) for _ in answer]
    answer_tokens = torch.tensor(answer * len(placed))
    kl_sequence, kl_position = request.essence_ids, len(request.essence_ids) - 1
    batch = [*sequences, kl_sequence]
    positions = torch.tensor([*subject_positions, kl_position])

    original = layer_outputs_at(adapter, layer, [placed[0][0]], [subject_positions[0]], pad)[:, 0]
    with torch.no_grad():
        base_kl = F.log_softmax(_run(model, [kl_sequence], pad)[0, kl_position].float(), -1)
    delta = torch.zeros(original.shape[0], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hp.lr)
    max_norm = hp.clamp_norm * original.norm()
    rows = torch.arange(len(batch))

    def shift(module, args, output):
        hidden = _hidden(output).clone()
        hidden[rows, positions] = hidden[rows, positions] + delta.to(hidden.dtype)
        return _with_hidden(output, hidden)

    with _hook(adapter.layers[layer], shift):
        for _ in range(hp.steps):
            logits = _run(model, batch, pad).float()
            log_probs = F.log_softmax(logits[torch.tensor(answer_rows), torch.tensor(answer_positions)], -1)
            token_log_probs = log_probs.gather(1, answer_tokens.view(-1, 1)).squeeze(1)
            if request.replacement_ids:
                edit_loss = -token_log_probs.mean()
                done = edit_loss.item() < 0.05
            else:
                probs = token_log_probs.exp()
                edit_loss = -torch.log1p(-probs.clamp(max=1 - 1e-6)).mean()
                done = probs.max().item() < hp.stop_probability
            kl_log_probs = F.log_softmax(logits[len(sequences), kl_position], -1)
            kl = F.kl_div(kl_log_probs, base_kl, log_target=True, reduction="sum")
            decay = hp.weight_decay * delta.norm() ** 2 / original.norm() ** 2
            if done:
                break
            optimizer.zero_grad()
            (edit_loss + hp.kl_factor * kl + decay).backward()
            optimizer.step()
            with torch.no_grad():
                if delta.norm() > max_norm:
                    delta.mul_(max_norm / delta.norm())
    return original + delta.detach().double()


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
    layers still to edit. Returns param name -> delta in the parameter's layout; the
    model's weights are restored before returning.
    """
    require_facts(facts)
    if max(layers) >= adapter.num_layers:
        raise PatcherError(f"layer {max(layers)} does not exist: the model has {adapter.num_layers} layers")
    model, pad = adapter.model, pad_id(tokenizer)
    n_special = leading_special_tokens(tokenizer)
    requests = [build_request(tokenizer, fact) for fact in facts]
    prefixes = sample_context_prefixes(model, tokenizer, hp.context_templates)
    last = layers[-1]
    targets = torch.stack(
        [target_value(adapter, last, r, prefixes, n_special, pad, hp) for r in progress(requests, "targets")],
        dim=1,
    )
    originals = {layer: adapter.down_proj(layer).weight.detach().clone() for layer in layers}
    deltas: dict[str, torch.Tensor] = {}
    try:
        for i, layer in enumerate(layers):
            keys = average_keys(adapter, layer, requests, prefixes, n_special, pad)
            current = layer_outputs_at(
                adapter, last, [r.prompt_ids for r in requests], [r.subject_end for r in requests], pad
            )
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
