"""Greedy generation from an ONNX export through optimum's `ORTModelForCausalLM`, as its users run it.

optimum-onnx pins transformers below 5, so it cannot share patcher's environment: it runs
in another Python, named by PATCHER_OPTIMUM_PYTHON (`.ci/run` builds one), which reads the
exported folder and nothing of patcher's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from patcher.errors import PatcherError

OPTIMUM_PYTHON = "PATCHER_OPTIMUM_PYTHON"

# Greedy, with optimum's defaults: each prompt alone, then all of them as one left-padded batch.
_GENERATE = """
import json, sys
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
folder, prompts, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
model = ORTModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
settings = dict(max_new_tokens=new_tokens, do_sample=False)
alone = [model.generate(**tokenizer(p, return_tensors="pt"), **settings)[0].tolist() for p in prompts]
batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **settings)
print(json.dumps({"alone": alone, "batch": batch[:, -new_tokens:].tolist(), "cache": model.can_use_cache}))
"""


def optimum_python() -> str | None:
    """The Python that has optimum-onnx, or None when none is configured."""
    return os.environ.get(OPTIMUM_PYTHON) or None


def optimum_generate(folder: Path, prompts: list[str], new_tokens: int) -> dict:
    """{"alone": each prompt's ids and continuation, "batch": the batch's new tokens, "cache":
    whether optimum found the past-key-values graph} from the export in `folder`."""
    python = optimum_python()
    if python is None:
        raise PatcherError(f"set {OPTIMUM_PYTHON} to a Python with optimum-onnx installed")
    command = [python, "-c", _GENERATE, str(folder), json.dumps(prompts), str(new_tokens)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise PatcherError(f"optimum's ORTModelForCausalLM cannot generate from the export: {_exception(run.stderr)}")
    return json.loads(run.stdout)


def pytorch_generate(folder: Path, prompts: list[str], new_tokens: int) -> dict:
    """The same generations from the safetensors folder in transformers, for comparison."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    settings = dict(max_new_tokens=new_tokens, do_sample=False)
    alone = [model.generate(**tokenizer(p, return_tensors="pt"), **settings)[0].tolist() for p in prompts]
    batch = model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **settings)
    return {"alone": alone, "batch": batch[:, -new_tokens:].tolist()}


def _exception(stderr: str) -> str:
    """The exception at the end of a traceback, its lines joined: what went wrong, without the frames."""
    lines = stderr.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]
    message = lines[frames[-1] + 1 :] if frames else lines[-1:]
    return " ".join(line.strip() for line in message) or "no output"
