"""The target search and the key capture that MEMIT and AlphaEdit share, on a tiny random Llama."""

import pytest
import torch
from helpers import DECODER
from transformers import LlamaConfig, LlamaForCausalLM

from patcher.adapters import causal_lm_adapter
from patcher.methods.lm_edit import EditRequest, TargetHparams, average_keys, target_values, values_at

PAD = 0


@pytest.fixture(scope="module")
def adapter():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DECODER)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked next-token distributions, as a trained model has
    return causal_lm_adapter(model)


def _requests(count: int, seed: int) -> list[EditRequest]:
    """Random facts: a prompt with its subject's last token, a one- or two-token target."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for i in range(count):
        length = 4 + i % 3
        prompt = [1, *torch.randint(2, 40, (length,), generator=generator).tolist()]
        target = torch.randint(2, 40, (1 + i % 2,), generator=generator).tolist()
        requests.append(EditRequest(prompt, prompt[: length - 1], length - 2, target, None))
    return requests


def _next_token_log_probs(adapter, layer, request, value):
    """log p(· | prompt) with the residual after `layer` at the subject set to `value`."""

    def overwrite(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, request.subject_end] = value.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = adapter.layers[layer].register_forward_hook(overwrite)
    try:
        with torch.no_grad():
            logits = adapter.model(input_ids=torch.tensor([request.prompt_ids])).logits
    finally:
        handle.remove()
    return logits[0, -1].log_softmax(-1)


def _target_probability(adapter, layer, request, value):
    """p(first target token | prompt) with the residual after `layer` at the subject set to `value`."""
    return _next_token_log_probs(adapter, layer, request, value)[request.target_ids[0]].exp().item()


def _known_facts(adapter, seed):
    """Requests whose target is the model's greedy next token; the subject ends the prompt,
    so the shifted residual feeds the next-token logits directly."""
    requests = []
    for r in _requests(3, seed=seed):
        with torch.no_grad():
            known = adapter.model(input_ids=torch.tensor([r.prompt_ids])).logits[0, -1].argmax().item()
        requests.append(EditRequest(r.prompt_ids, r.essence_ids, len(r.prompt_ids) - 1, [known], None))
    return requests


def test_facts_searched_together_follow_their_own_path(adapter):
    requests = _requests(5, seed=1)
    prefixes = [[], [7, 8], [9, 10, 11]]
    hp = TargetHparams(steps=12)
    alone = target_values(adapter, 1, requests, prefixes, 1, PAD, hp, rows_per_pass=1)
    together = target_values(adapter, 1, requests, prefixes, 1, PAD, hp, rows_per_pass=64)
    assert alone.shape == (32, 5)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)


def test_the_target_value_makes_the_target_unlikely(adapter):
    requests = _known_facts(adapter, seed=2)
    hp = TargetHparams(steps=40, kl_factor=0.0, clamp_norm=100.0)
    values = target_values(adapter, 2, requests, [[]], 1, PAD, hp)
    for request, value in zip(requests, values.T, strict=True):
        unedited = values_at(adapter, 2, [request.prompt_ids], [request.subject_end], PAD)[:, 0]
        assert _target_probability(adapter, 2, request, unedited) > 0.1
        assert _target_probability(adapter, 2, request, value) < hp.stop_probability


@pytest.mark.parametrize("margin", [0.0, 3.0])
def test_the_search_goes_on_until_the_target_trails_by_the_margin(adapter, margin):
    # A stop probability of 1 leaves the margin as the only stopping rule; small steps
    # (this model's logits move fast) let it stop just past the margin.
    requests = _known_facts(adapter, seed=5)
    hp = TargetHparams(steps=2000, lr=1e-4, kl_factor=0.0, clamp_norm=100.0, stop_probability=1.0, margin=margin)
    values = target_values(adapter, 2, requests, [[]], 1, PAD, hp)
    for request, value in zip(requests, values.T, strict=True):
        log_probs = _next_token_log_probs(adapter, 2, request, value)
        target = log_probs[request.target_ids[0]].item()
        lead = target - log_probs.scatter(0, torch.tensor(request.target_ids), -torch.inf).max().item()
        assert -margin - 1.0 < lead <= -margin


def test_weights_keep_requires_grad_after_the_search(adapter):
    flags = [p.requires_grad for p in adapter.model.parameters()]
    target_values(adapter, 0, _requests(1, seed=3), [[]], 1, PAD, TargetHparams(steps=2))
    assert [p.requires_grad for p in adapter.model.parameters()] == flags
    assert all(p.grad is None for p in adapter.model.parameters())


def _reference_capture(adapter, module, pre, sequences, positions):
    """The same quantity from a full, unstopped forward pass of each sequence alone."""
    seen = []
    if pre:
        handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
    try:
        with torch.no_grad():
            for ids in sequences:
                adapter.model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return torch.stack([x[0, position].double() for x, position in zip(seen, positions, strict=True)], dim=1)


def test_captures_over_more_than_one_pass_match_single_sequence_forwards(adapter):
    requests = _requests(25, seed=4)  # 25 facts x 3 contexts: two passes of 64
    prefixes = [[], [7], [9, 10]]
    keys = average_keys(adapter, 2, requests, prefixes, 1, PAD)
    placed = [(r.prompt_ids[:1] + p + r.prompt_ids[1:], r.subject_end + len(p)) for r in requests for p in prefixes]
    reference = _reference_capture(adapter, adapter.down_proj(2), True, *zip(*placed, strict=True))
    expected = reference.view(-1, len(requests), len(prefixes)).mean(dim=2)
    torch.testing.assert_close(keys, expected, rtol=1e-5, atol=1e-5)

    sequences, positions = [ids for ids, _ in placed], [pos for _, pos in placed]
    outputs = values_at(adapter, 1, sequences, positions, PAD)
    torch.testing.assert_close(
        outputs, _reference_capture(adapter, adapter.layers[1], False, sequences, positions), rtol=1e-5, atol=1e-5
    )
