"""Streaming apply of a sharded checkpoint, against from_pretrained + apply + save_pretrained.

    python bench/apply.py [--quick]

A Llama-shaped model of about 0.5 GB (fp32, random weights, 8 layers of 1024 / 2816, vocab
16000) saved by transformers in 64 MB shards, and a MEMIT-style dense patch of two
down-projections. Providers, each in its own process after the same imports (torch,
transformers, patcher): `from_pretrained` loads the model, `patch.apply_to`s it and
`save_pretrained`s it in 64 MB shards, what a user would otherwise write; `patcher-apply`
runs `patcher apply`, which copies each shard and overwrites only the patched tensors'
bytes. Peak memory is the process's peak RSS (VmHWM, reset after the imports) above its
RSS after the imports; the budget of the scale issue is 2 × the largest shard + the patch
file. Both outputs hold the same patched weights (checked).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from kernel_harness import Results, detect_device, parse_args
from safetensors import safe_open

from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch

SHARDS = {"full": "64MB", "quick": "8MB"}
PATCHED_LAYERS = (2, 5)
# Run in a fresh interpreter: the same imports for every provider, then the timed task.
CHILD = """
import json, re, sys, time
import torch, transformers
import patcher.cli, patcher.formats.hf, patcher.models  # everything `patcher apply` imports
from patcher.formats.patch import Patch
model, patch, out, provider, shard = sys.argv[1:]
def status_kb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
imported = status_kb("VmRSS")
start = time.perf_counter()
if provider == "patcher-apply":
    patcher.cli.main(["apply", model, patch, "--out", out])
else:
    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    Patch.load(patch).apply_to(lm)
    lm.save_pretrained(out, max_shard_size=shard)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_above_imports_mb": (status_kb("VmHWM") - imported) / 1024}))
"""


def build_model(folder: Path, quick: bool) -> None:
    """The sharded random Llama checkpoint (transformers' own save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=6, vocab_size=4000) if quick else dict(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, vocab_size=16000
    )  # fmt: skip
    torch.manual_seed(0)
    config = LlamaConfig(num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, **size)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size=SHARDS["quick" if quick else "full"])


def build_patch(model: Path, path: Path) -> Patch:
    checkpoint = Checkpoint(model)
    params = [f"model.layers.{layer}.mlp.down_proj.weight" for layer in PATCHED_LAYERS]
    generator = torch.Generator().manual_seed(1)
    deltas = {p: torch.randn(checkpoint.tensor(p).shape, generator=generator) * 1e-3 for p in params}
    patch = Patch.from_deltas(deltas, "memit", {}, checkpoint.fingerprints(params))
    patch.save(path)
    return patch


def run_provider(provider: str, model: Path, patch: Path, out: Path, shard: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(patch), str(out), provider, shard],
        capture_output=True, text=True, check=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def patched_tensor(folder: Path, name: str) -> torch.Tensor:
    checkpoint = Checkpoint(folder)
    with safe_open(checkpoint.shard_of[name], framework="pt") as f:
        return f.get_tensor(name)


def main() -> None:
    args = parse_args(__doc__)
    results = Results("apply", detect_device())
    with tempfile.TemporaryDirectory(prefix="patcher-bench-apply-") as tmp:
        model, patch_file = Path(tmp) / "model", Path(tmp) / "patch.safetensors"
        build_model(model, args.quick)
        patch = build_patch(model, patch_file)
        shards = sorted(model.glob("*.safetensors"))
        total_mb = sum(s.stat().st_size for s in shards) / 2**20
        largest_mb = max(s.stat().st_size for s in shards) / 2**20
        patch_mb = patch_file.stat().st_size / 2**20
        budget = 2 * largest_mb + patch_mb
        shape = f"{total_mb:.0f} MB in {len(shards)} shards (largest {largest_mb:.0f} MB), patch {patch_mb:.0f} MB"
        outputs = {}
        for provider in ("from_pretrained", "patcher-apply"):
            outputs[provider] = Path(tmp) / provider
            shard = SHARDS["quick" if args.quick else "full"]
            measured = run_provider(provider, model, patch_file, outputs[provider], shard)
            peak = measured["peak_above_imports_mb"]
            results.add(provider, shape, measured["seconds"] * 1e3, peak_rss_above_imports_mb=round(peak, 1),
                        budget_mb=round(budget, 1), within_budget=peak <= budget)  # fmt: skip
        for name in patch.params:
            expected = patched_tensor(outputs["from_pretrained"], name)
            assert torch.equal(patched_tensor(outputs["patcher-apply"], name), expected), name
    results.write("from_pretrained", args.out)
    for row in results.rows:
        print(f"{row['provider']}: peak RSS above imports {row['peak_rss_above_imports_mb']} MB "
              f"(budget {row['budget_mb']} MB)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
