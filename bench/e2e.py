"""End-to-end costs: statistics collection against a plain forward pass, and the edit itself.

    python bench/e2e.py [--batches 8] [--out bench/results/e2e-cpu.csv]

Both providers run in this process over the same token batches: `forward` is what a user
pays to run the model over the corpus once; `stats` is patcher's collection of E[k kᵀ] for
the layers an edit uses (the forward pass stops after the deepest of them), and
`stats-all-layers` collects every layer, where no early stop is possible.
"""

from __future__ import annotations

import argparse
import csv
import platform
import time
from pathlib import Path

import torch
from kernel_harness import commit
from transformers import GPT2Config, GPT2LMHeadModel

from patcher.adapters import causal_lm_adapter
from patcher.families.causal_lm import resolve_layers
from patcher.fixtures import build_fixture
from patcher.methods import EditInputs, get_method
from patcher.methods.lm_edit import auto_layers
from patcher.methods.memit import memit_update
from patcher.models import load_causal_lm
from patcher.spec import load_spec
from patcher.stats import collect_second_moments, corpus_batches, read_corpus


def median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def forward_all(model, batches) -> None:
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask)


def layer_label(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 2 else ",".join(map(str, layers))


def stats_rows(name: str, adapter, batches, layers: list[int]) -> list[dict]:
    tokens = sum(int(mask.sum()) for _, mask in batches)
    forward = median_seconds(lambda: forward_all(adapter.model, batches))
    rows = [{"model": name, "provider": "forward", "layers": "-", "tokens": tokens, "seconds": forward}]
    for label, chosen in (("stats", layers), ("stats-all-layers", list(range(adapter.num_layers)))):
        seconds = median_seconds(lambda c=chosen: collect_second_moments(adapter, batches, c))
        rows.append(
            {
                "model": name,
                "provider": label,
                "layers": layer_label(chosen),
                "tokens": tokens,
                "seconds": seconds,
            }
        )
    for row in rows:
        row["ratio_to_forward"] = row["seconds"] / forward
    return rows


def fixture_rows(cache: Path) -> list[dict]:
    folder = build_fixture("lm", cache / "bench-fixture")
    model, tokenizer = load_causal_lm(folder)
    adapter = causal_lm_adapter(model)
    spec = load_spec(folder / "spec.toml")
    layers = resolve_layers(spec.layers, adapter, tokenizer, spec.forget)
    batches = list(corpus_batches(tokenizer, read_corpus(folder / "corpus.txt")))
    rows = stats_rows("lm-fixture", adapter, batches, layers)
    stats = collect_second_moments(adapter, batches, layers)
    for method in ("memit", "alphaedit"):
        start = time.perf_counter()
        get_method(method)(EditInputs(adapter, tokenizer, spec, stats, layers))
        rows.append(
            {
                "model": "lm-fixture",
                "provider": f"edit-{method}",
                "layers": layer_label(layers),
                "tokens": len(spec.forget),
                "seconds": time.perf_counter() - start,
                "ratio_to_forward": "",
            }
        )
    return rows


def gpt2_small_rows(n_batches: int) -> list[dict]:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, 768 wide, MLP 3072
    adapter = causal_lm_adapter(model)
    layers = auto_layers(adapter.num_layers)
    batches = [
        (torch.randint(model.config.vocab_size, (8, 128)), torch.ones(8, 128, dtype=torch.long))
        for _ in range(n_batches)
    ]
    rows = stats_rows("gpt2-small-random", adapter, batches, layers)
    # The closed-form solve of one layer at GPT-2-small width, for 24 facts.
    keys, residuals = torch.randn(3072, 24, dtype=torch.float64), torch.randn(768, 24, dtype=torch.float64)
    sample = torch.randn(3072, 8192, dtype=torch.float64)
    cov = sample @ sample.T / sample.shape[1]
    seconds = median_seconds(lambda: memit_update(keys, residuals, cov, 15000.0))
    rows.append(
        {
            "model": "gpt2-small-random",
            "provider": "memit-solve-per-layer",
            "layers": "1",
            "tokens": 24,
            "seconds": seconds,
            "ratio_to_forward": "",
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="GPT-2-small batches of 8 x 128 tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results/e2e-cpu.csv"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/patcher-bench"))
    args = parser.parse_args()

    rows = fixture_rows(args.cache) + gpt2_small_rows(args.batches)
    device = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    for row in rows:
        row.update(device=device, commit=commit())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    print(f"{'model':<20}{'provider':<24}{'layers':<10}{'tokens':>8}{'seconds':>10}{'x forward':>11}")
    for row in rows:
        ratio = f"{row['ratio_to_forward']:.2f}" if row["ratio_to_forward"] != "" else "-"
        print(
            f"{row['model']:<20}{row['provider']:<24}{row['layers']:<10}{row['tokens']:>8}"
            f"{row['seconds']:>10.3f}{ratio:>11}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
