"""Per-sample Fisher end to end: patcher's collection against materialising per-sample gradients.

    python bench/fisher.py

Every MLP down-projection of: the LM fixture (4 layers, 512 -> 128) over 64 corpus lines;
a GPT-2-small-shaped model (2 layers of 768 / 3072, random weights) over 2 batches of
8 x 128 random tokens (long samples: activations dominate memory); the same model over 2
batches of 64 x 16 tokens (short samples such as facts, the usual unlearning data:
per-sample gradients dominate memory). Providers, each in its own process:
`patcher` is `stats.collect_fisher` (each sample's gradient squared a few samples at a
time, or by the Triton kernel on CUDA); `opacus-einsum` hooks the same layers and
materialises every sample's gradient with an einsum (B x d_out x d_in), as Opacus does,
then squares and sums. Peak memory is the process's peak RSS (or CUDA peak) above what
was live after loading the model and data.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kernel_harness import Results, detect_device, relative_error
from safetensors.torch import load_file, save_file

from patcher.adapters import causal_lm_adapter
from patcher.stats import collect_fisher

MODELS = ("lm-fixture", "gpt2-small-shaped", "gpt2-small-short")
GPT2_BATCHES = {"gpt2-small-shaped": (8, 128), "gpt2-small-short": (64, 16)}  # samples x tokens
PROVIDERS = ("opacus-einsum", "patcher")


def setup(model_name: str):
    """(adapter, batches, layers, description) for one benchmark model."""
    if model_name == "lm-fixture":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from patcher.fixtures import build_fixture
        from patcher.stats import corpus_batches, read_corpus

        folder = build_fixture("lm", Path(tempfile.mkdtemp(prefix="patcher-bench-")) / "lm")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        batches = list(corpus_batches(tokenizer, read_corpus(folder / "corpus.txt")[:64], batch_size=16))
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        return causal_lm_adapter(model), batches, [0, 1, 2, 3], "LM fixture, 4 layers 512->128, 64 lines"
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=768, n_layer=2, n_head=12)).eval()
    samples, tokens = GPT2_BATCHES[model_name]
    batches = [
        (torch.randint(50257, (samples, tokens)), torch.ones(samples, tokens, dtype=torch.long)) for _ in range(2)
    ]
    description = f"GPT-2-small shapes, 2 layers 3072->768, 2x{samples}x{tokens}"
    return causal_lm_adapter(model), batches, [0, 1], description


def opacus_einsum(adapter, batches, layers) -> dict[str, torch.Tensor]:
    """The same Σ_n (∂ℓ_n/∂W)², each sample's gradient materialised whole (Opacus's einsum)."""
    modules = {adapter.down_proj_name(layer): adapter.down_proj(layer) for layer in layers}
    sums = {name: torch.zeros(adapter.model_dim, adapter.key_dim) for name in modules}

    def track(name: str):
        def hook(module, args, output):
            inputs = args[0].detach()

            def accumulate(grad: torch.Tensor) -> None:
                per_sample = torch.einsum("bto,bti->boi", grad.float(), inputs.float())
                sums[name].add_(per_sample.square().sum(0))

            output.register_hook(accumulate)

        return hook

    handles = [module.register_forward_hook(track(name)) for name, module in modules.items()]
    model = adapter.model
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    try:
        for ids, mask in batches:
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            counted = mask[:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            ((nll * counted).sum(1) / counted.sum(1).clamp(min=1)).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    return {name: adapter.to_param_layout(s) for name, s in sums.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def worker(model_name: str, provider: str, out: str) -> None:
    """Run one provider once in this fresh process; print its time and peak memory as JSON."""
    adapter, batches, layers, description = setup(model_name)
    before = peak_rss_mb()
    start = time.perf_counter()
    if provider == "patcher":
        sums = collect_fisher(adapter, batches, layers).sums
    else:
        sums = opacus_einsum(adapter, batches, layers)
    elapsed = (time.perf_counter() - start) * 1e3
    save_file({k: v.contiguous() for k, v in sums.items()}, out)
    print(json.dumps({"ms": elapsed, "peak_extra_mb": round(peak_rss_mb() - before, 1), "shape": description}))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:5])
        return
    results = Results("fisher", detect_device())
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in MODELS:
            sums = {}
            for provider in PROVIDERS:
                out = str(Path(tmp) / f"{model_name}-{provider}.safetensors")
                command = [sys.executable, __file__, "--worker", model_name, provider, out]
                run = subprocess.run(command, capture_output=True, text=True, check=True)
                measured = json.loads(run.stdout.strip().splitlines()[-1])
                sums[provider] = load_file(out)
                error = max(
                    relative_error(sums[provider][name], sums["opacus-einsum"][name]) for name in sums[provider]
                )
                results.add(
                    provider, measured["shape"], measured["ms"], peak_extra_mb=measured["peak_extra_mb"],
                    error_vs_opacus=f"{error:.1e}",
                )  # fmt: skip
    results.write("opacus-einsum")


if __name__ == "__main__":
    main()
