"""Statistics of down-projections: second moments (hooks, padding, early stop, files) and per-sample Fisher."""

import pytest
import torch
from helpers import tiny_llama_config
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from patcher.adapters import causal_lm_adapter
from patcher.errors import PatcherError
from patcher.stats import SecondMoments, collect_fisher, collect_second_moments


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    config = tiny_llama_config(32, 48, layers=3, vocab=40)
    return causal_lm_adapter(LlamaForCausalLM(config).eval())


def reference_sums(adapter, batches, layer):
    """Independent: capture full inputs with a hook, select unpadded tokens, float64 xᵀx."""
    total = torch.zeros(48, 48, dtype=torch.float64)
    for ids, mask in batches:
        seen = {}
        handle = adapter.down_proj(layer).register_forward_pre_hook(lambda m, a, seen=seen: seen.setdefault("x", a[0]))
        with torch.no_grad():
            adapter.model(input_ids=ids, attention_mask=mask)
        handle.remove()
        x = seen["x"][mask.bool()].double()
        total += x.T @ x
    return total


def test_matches_reference_and_skips_padding(tiny):
    torch.manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(40, (4, 9))
        mask = torch.ones(4, 9, dtype=torch.long)
        mask[1, 5:] = 0
        mask[3, 2:] = 0
        batches.append((ids, mask))
    stats = collect_second_moments(tiny, batches, [0, 2])
    assert stats.token_count == sum(int(m.sum()) for _, m in batches)
    for layer in (0, 2):
        name = tiny.down_proj_name(layer)
        expected = reference_sums(tiny, batches, layer)
        torch.testing.assert_close(stats.sums[name].double(), expected, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(stats.mean(name), expected / stats.token_count, rtol=1e-4, atol=1e-5)


def test_early_stop_gives_the_same_sums(tiny):
    ids, mask = torch.randint(40, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    only_first = collect_second_moments(tiny, [(ids, mask)], [0])
    all_layers = collect_second_moments(tiny, [(ids, mask)], [0, 1, 2])
    name = tiny.down_proj_name(0)
    torch.testing.assert_close(only_first.sums[name], all_layers.sums[name])


def test_file_round_trip_and_missing_layer(tiny, tmp_path):
    ids, mask = torch.randint(40, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    stats = collect_second_moments(tiny, [(ids, mask)], [1])
    stats.save(tmp_path / "s.safetensors")
    loaded = SecondMoments.load(tmp_path / "s.safetensors")
    assert loaded.token_count == 14
    torch.testing.assert_close(loaded.sums[tiny.down_proj_name(1)], stats.sums[tiny.down_proj_name(1)])
    with pytest.raises(PatcherError, match="no second moment for model.layers.0"):
        loaded.mean(tiny.down_proj_name(0))


def padded_batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(2)
    batches = []
    for lengths in ((9, 4, 7), (6, 9)):
        ids = torch.randint(vocab, (len(lengths), max(lengths)))
        mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
        batches.append((ids, mask))
    return batches


def fisher_one_sample_at_a_time(adapter, batches, layer) -> torch.Tensor:
    """Independent: autograd on each unpadded sample alone, gradient squared, in float64."""
    weight = adapter.down_proj(layer).weight
    total = torch.zeros(weight.shape, dtype=torch.float64)
    for ids, mask in batches:
        for row, row_mask in zip(ids, mask, strict=True):
            sample = row[row_mask.bool()][None]
            logits = adapter.model(input_ids=sample).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits, sample[0, 1:])
            (grad,) = torch.autograd.grad(loss, weight)
            total += grad.double().square()
    return total


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fisher_is_per_sample_exact_and_skips_padding(family):
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(tiny_llama_config(32, 48, layers=3, vocab=40))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=3, n_head=4, n_positions=32))
    adapter = causal_lm_adapter(model.eval())
    batches = padded_batches(40)
    fisher = collect_fisher(adapter, batches, [0, 2])
    assert fisher.sample_count == 5
    for layer in (0, 2):
        name = adapter.down_proj_name(layer)
        expected = fisher_one_sample_at_a_time(adapter, batches, layer)
        assert fisher.sums[name].shape == adapter.down_proj(layer).weight.shape
        torch.testing.assert_close(fisher.sums[name].double(), expected, rtol=1e-3, atol=1e-9)
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored


def test_batch_mean_fisher_is_what_ssd_computes_for_unequal_batches_and_differs_from_per_sample():
    torch.manual_seed(1)
    adapter = causal_lm_adapter(LlamaForCausalLM(tiny_llama_config(32, 48, layers=2, vocab=40)).eval())
    batches = padded_batches(40)  # 3 samples, then 2
    name, weight = adapter.down_proj_name(1), adapter.down_proj(1).weight
    importance = torch.zeros(weight.shape, dtype=torch.float64)
    for ids, mask in batches:  # SSD's loop: each batch's mean loss, its gradient squared, summed
        losses = []
        for row, row_mask in zip(ids, mask, strict=True):
            sample = row[row_mask.bool()][None]
            logits = adapter.model(input_ids=sample).logits[0, :-1]
            losses.append(torch.nn.functional.cross_entropy(logits, sample[0, 1:]))
        (grad,) = torch.autograd.grad(torch.stack(losses).mean(), weight)
        importance += grad.double().square()
    importance /= len(batches)  # ... and divided by the number of batches
    batch_mean = collect_fisher(adapter, batches, [1], batch_mean=True)
    assert batch_mean.kind == "fisher-batch-mean" and batch_mean.sample_count == len(batches)
    mean = batch_mean.sums[name].double() / batch_mean.sample_count
    torch.testing.assert_close(mean, importance, rtol=1e-3, atol=1e-9)
    per_sample = collect_fisher(adapter, batches, [1])
    per_sample_mean = per_sample.sums[name].double() / per_sample.sample_count
    assert (per_sample_mean - mean).norm() > 0.1 * per_sample_mean.norm()  # squares of sums ≠ sums of squares

    ids, mask = batches[0]
    twins = [(ids[:1].repeat(3, 1), mask[:1].repeat(3, 1))]  # one sample thrice: every gradient agrees
    twin_batch_mean, twin_per_sample = (collect_fisher(adapter, twins, [1], batch_mean=flag) for flag in (True, False))
    torch.testing.assert_close(
        twin_batch_mean.sums[name] / twin_batch_mean.sample_count,
        twin_per_sample.sums[name] / twin_per_sample.sample_count,
        rtol=1e-4,
        atol=1e-10,
    )
