"""ONNX exports run through optimum's onnxruntime classes, as their users run them: greedy
generation in `ORTModelForCausalLM`, images from `ORTStableDiffusionPipeline`.

optimum-onnx pins transformers below 5, so it cannot share patcher's environment: it runs
in another Python, named by PATCHER_OPTIMUM_PYTHON (`.ci/run` builds one), which reads the
exported folder and nothing of patcher's.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import torch

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


# One image from given initial latents, so that PyTorch can draw the same one.
_DRAW = """
import sys, numpy as np, torch
from optimum.onnxruntime import ORTStableDiffusionPipeline
folder, prompt, steps, latents, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
pipe = ORTStableDiffusionPipeline.from_pretrained(folder)
image = pipe(prompt, num_inference_steps=steps, latents=torch.from_numpy(np.load(latents)), output_type="np").images[0]
np.save(out, image)
print(type(pipe).__name__)
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


def optimum_draw(folder: Path, prompt: str, latents: np.ndarray, steps: int) -> tuple[str, np.ndarray]:
    """(the class optimum loaded the export as, the (H, W, 3) image in [0, 1]) drawn by optimum's
    ONNX Stable Diffusion pipeline from the export in `folder`, starting from `latents`."""
    python = optimum_python()
    if python is None:
        raise PatcherError(f"set {OPTIMUM_PYTHON} to a Python with optimum-onnx installed")
    with tempfile.TemporaryDirectory(prefix="patcher-optimum-") as tmp:
        start, image = Path(tmp) / "latents.npy", Path(tmp) / "image.npy"
        np.save(start, latents)
        command = [python, "-c", _DRAW, str(folder), prompt, str(steps), str(start), str(image)]
        run = subprocess.run(command, capture_output=True, text=True)
        if run.returncode != 0:
            reason = _exception(run.stderr)
            raise PatcherError(f"optimum's ORTStableDiffusionPipeline cannot draw from the export: {reason}")
        return run.stdout.split()[-1], np.load(image)


def pytorch_draw(folder: Path, prompt: str, latents: np.ndarray, steps: int) -> np.ndarray:
    """The same image from the diffusers pipeline in `folder`, for comparison."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    start = torch.from_numpy(latents)
    return pipe(prompt, num_inference_steps=steps, latents=start, output_type="np").images[0]


def _exception(stderr: str) -> str:
    """The exception at the end of a traceback, its lines joined: what went wrong, without the frames."""
    lines = stderr.strip().splitlines()
    frames = [i for i, line in enumerate(lines) if line.startswith("  ")]
    message = lines[frames[-1] + 1 :] if frames else lines[-1:]
    return " ".join(line.strip() for line in message) or "no output"
