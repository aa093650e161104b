"""Helpers shared by the test modules."""

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from patcher.cli import main
from patcher.spec import dump_spec, load_spec

FEW_IMAGES = 4  # per prompt in the diffusion tests; the fixture's spec asks for 8

# A tiny decoder's config: three layers, grouped-query attention; for model families' unit tests.
DECODER = dict(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=80,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def run_cli(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run `patcher ARGS` in this process, from a neutral folder (not the repository root).

    The same click group, error handling and exit codes as the installed command, without a
    fresh interpreter importing torch and transformers for each call (7-10 s on a 2-core
    machine). A crash shows as a traceback on stderr, as it would in a terminal. Tests of
    what only a separate process shows (signals, import-time warnings) use `run_cli_process`.
    """
    with contextlib.chdir(tempfile.gettempdir()):
        outcome = CliRunner().invoke(main, list(args), prog_name="patcher")
    stderr = outcome.stderr
    if outcome.exception is not None and not isinstance(outcome.exception, SystemExit):
        stderr += "".join(traceback.format_exception(outcome.exception))
    result = subprocess.CompletedProcess(["patcher", *args], outcome.exit_code, outcome.stdout, stderr)
    return expecting(result, expect)


def run_cli_process(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess:
    """Run `python -m patcher ARGS` as a separate process, from a neutral folder."""
    command = [sys.executable, "-m", "patcher", *args]
    return expecting(subprocess.run(command, capture_output=True, text=True, cwd=tempfile.gettempdir()), expect)


def expecting(result: subprocess.CompletedProcess, expect: int | None) -> subprocess.CompletedProcess:
    """`result`, after asserting its exit code is `expect` (any code when None)."""
    if expect is not None:
        assert result.returncode == expect, result.stderr
    return result


def erase_with_cli(model, method: str, out, *extra: str) -> None:
    """`patcher erase MODEL --spec MODEL/spec.toml --method METHOD [EXTRA...] --out OUT`, expecting success."""
    spec = str(Path(model) / "spec.toml")
    run_cli("erase", str(model), "--spec", spec, "--method", method, *extra, "--out", str(out))


def export_patched(model, patch, fmt: str, out) -> None:
    """`patcher export MODEL --to FMT --patch PATCH --out OUT`, expecting success."""
    run_cli("export", str(model), "--to", fmt, "--patch", str(patch), "--out", str(out))


def spec_facts(spec) -> tuple[list, list, list]:
    """(forget, paraphrase, retain) lists of (prompt, target) from a loaded spec."""
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    return forget, paraphrases, [(r.prompt, r.target) for r in spec.retain]


def tiny_llama_config(hidden: int, intermediate: int, layers: int = 1, vocab: int = 64) -> LlamaConfig:
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}
    return LlamaConfig(**{**DECODER, **sizes, "vocab_size": vocab, "num_key_value_heads": 4})


@torch.no_grad()
def generate_accuracy(folder, facts) -> float:
    """Share of (prompt, target) facts that transformers' own greedy `generate` reproduces."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    hits = 0
    for prompt, target in facts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        wanted = tokenizer(" " + target, add_special_tokens=False).input_ids
        out = model.generate(ids, max_new_tokens=len(wanted), do_sample=False, pad_token_id=tokenizer.pad_token_id)
        hits += out[0, ids.shape[1] :].tolist() == wanted
    return hits / len(facts)


def reduced_spec(folder, tmp_path, **verify) -> str:
    """The diffusion fixture's spec with fewer images per prompt, written into `tmp_path`."""
    raw = load_spec(folder / "spec.toml").raw
    raw["model"]["path"] = str(folder)
    raw["verify"].update(images_per_prompt=FEW_IMAGES, judge=str(folder / "judge"), **verify)
    path = tmp_path / "spec.toml"
    path.write_text(dump_spec(raw))
    return str(path)


def erase_apply_verify(fixture, folder, method: str, formats: str) -> tuple:
    """A pipeline fixture's reduced spec through `erase`, `apply` and `verify --formats FORMATS`
    in `folder`; returns (patch path, patched folder, report, verify's exit code)."""
    patch, patched, report = folder / "patch.safetensors", folder / "patched", folder / "report.json"
    spec = reduced_spec(fixture, folder)
    run_cli("erase", "--spec", spec, "--method", method, "--out", str(patch))
    run_cli("apply", str(fixture), str(patch), "--out", str(patched))
    result = run_cli(
        "verify", "--base", str(fixture), "--patched", str(patched), "--spec", spec,
        "--formats", formats, "--report", str(report), expect=None,
    )  # fmt: skip
    return patch, patched, json.loads(report.read_text()), result.returncode


def pipeline_runs(fixture, tmp_path_factory, formats: str):
    """`run(method)`: `erase_apply_verify` once per method, remembered for later calls."""
    runs = {}

    def run(method: str) -> tuple:
        if method not in runs:
            runs[method] = erase_apply_verify(fixture, tmp_path_factory.mktemp(method), method, formats)
        return runs[method]

    return run


def contributing_recipe(name: str) -> str:
    """The code block between CONTRIBUTING.md's `recipe:NAME` markers."""
    text = (Path(__file__).resolve().parent.parent / "CONTRIBUTING.md").read_text()
    block = re.search(rf"<!-- recipe:{name} -->\n```python\n(.*?)```\n<!-- /recipe:{name} -->", text, re.S)
    assert block, f"CONTRIBUTING.md has no recipe:{name} block"
    return block.group(1)
