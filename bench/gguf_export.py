"""GGUF exports of a real pretrained model: SmolLM2-135M (the `patcher fixture smollm2` folder).

    python bench/gguf_export.py --model DIR [--out bench/results/gguf-cpu.csv]

For each GGUF format: export seconds, file size, and the unedited model read back by
transformers' GGUF loader, scored as verify scores it (every fact of the fixture's spec,
forget and retain, and perplexity on its held-out text), beside the same figures in
full precision. Also whether the tokenizer rebuilt from the file tokenizes the spec's
prompts and the held-out text exactly as the model's own. Prints a Markdown table and
writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.formats.llama_cpp import GGUF_FORMATS, export_gguf, gguf_file_name, load_gguf
from patcher.spec import load_spec
from patcher.verification.lm import heldout_text, lm_metrics

COLUMNS = ("format", "export_s", "file_mb", "forget_accuracy", "retain_accuracy", "perplexity", "same_tokens")


def same_tokens(model: Path, exported: Path, fmt: str, texts: list[str]) -> bool:
    """Whether the tokenizer transformers builds from the file alone splits `texts` as the model's own."""
    own = AutoTokenizer.from_pretrained(model)
    bare = exported.parent / f"{exported.name}-file-only"
    bare.mkdir()
    (bare / gguf_file_name(fmt)).symlink_to(exported / gguf_file_name(fmt))
    from_file = AutoTokenizer.from_pretrained(bare, gguf_file=gguf_file_name(fmt))
    return all(
        own(text, add_special_tokens=False).input_ids == from_file(text, add_special_tokens=False).input_ids
        for text in texts
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a `patcher fixture smollm2` folder")
    parser.add_argument("--out", type=Path, default=Path("bench/results/gguf-cpu.csv"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    spec = load_spec(args.model / "spec.toml")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts = [f.prompt for f in [*spec.forget, *spec.retain]] + [heldout_text(spec)]
    full = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = [{"format": "safetensors (fp32)", "export_s": "", "file_mb": "", **lm_metrics(full, tokenizer, spec)}]
    rows[0]["same_tokens"] = ""
    del full
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in GGUF_FORMATS:
            out = Path(tmp) / fmt
            start = time.perf_counter()
            export_gguf(args.model, fmt, out)
            seconds = time.perf_counter() - start
            metrics = lm_metrics(load_gguf(out), tokenizer, spec)
            rows.append(
                {
                    "format": fmt,
                    "export_s": f"{seconds:.1f}",
                    "file_mb": f"{(out / gguf_file_name(fmt)).stat().st_size / 1e6:.0f}",
                    **metrics,
                    "same_tokens": same_tokens(args.model, out, fmt, texts),
                }
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
