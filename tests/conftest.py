"""Shared fixtures. The LM fixture is built once (about 2 minutes cold) and cached."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# `python -m pytest` puts the repository root on sys.path, where the folder `kernels/`
# would shadow Hugging Face's `kernels` package that transformers probes on import.
# patcher is imported from its installed mapping (patcher.kernels), never from the root.
_ROOT = str(Path(__file__).resolve().parent.parent)
sys.path[:] = [p for p in sys.path if p not in ("", ".", _ROOT, os.getcwd())]

# The CLI quiets the libraries' logs and bars through variables they read on import; tests
# run the CLI in this process (helpers.run_cli), so they are set before anything imports them.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, os.cpu_count() or 1))

# Without a GPU, Triton kernels run only interpreted, and Triton fixes that when a kernel is
# decorated (on import of patcher.kernels), so it is set before any test imports patcher.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(params=["torch", "triton"])
def kernel_device(request, monkeypatch) -> torch.device:
    """Run a kernel test once per implementation (PATCHER_KERNELS); Triton on the GPU when there is one."""
    monkeypatch.setenv("PATCHER_KERNELS", request.param)
    on_gpu = request.param == "triton" and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


@pytest.fixture(scope="session")
def lm_fixture(tmp_path_factory) -> Path:
    """The LM fixture folder (model, tokenizer, spec.toml, corpus.txt)."""
    from patcher.fixtures import build_fixture

    return build_fixture("lm", tmp_path_factory.mktemp("fixture") / "lm")


@pytest.fixture(scope="session")
def diffusion_fixture(tmp_path_factory) -> Path:
    """The text-to-image fixture folder (pipeline, judge/, spec.toml, corpus.txt); about 3 minutes cold."""
    from patcher.fixtures import build_fixture

    return build_fixture("diffusion", tmp_path_factory.mktemp("fixture") / "diffusion")


@pytest.fixture(scope="session")
def sdxl_fixture(tmp_path_factory) -> Path:
    """The same shapes drawn by an SDXL pipeline (two encoders, pooled and size conditioning); about 4 minutes cold."""
    from patcher.fixtures import build_fixture

    return build_fixture("sdxl", tmp_path_factory.mktemp("fixture") / "sdxl")


@pytest.fixture(scope="session")
def classifier_fixture(tmp_path_factory) -> Path:
    """The classifier fixture folder (ResNet, image processor, data/, spec.toml); seconds to build."""
    from patcher.fixtures import build_fixture

    return build_fixture("classifier", tmp_path_factory.mktemp("fixture") / "classifier")


@pytest.fixture(scope="session")
def memit_patch(lm_fixture, tmp_path_factory) -> Path:
    """A MEMIT patch of the LM fixture's own spec, erased once through the CLI and read by
    every test that needs a real patch (apply, inspect, PEFT export, the exported model)."""
    from helpers import erase_with_cli

    out = tmp_path_factory.mktemp("memit") / "memit.safetensors"
    erase_with_cli(lm_fixture, "memit", out)
    return out


@pytest.fixture(scope="session")
def demo_run(lm_fixture, tmp_path_factory) -> tuple[Path, dict]:
    """`patcher demo --json` run once: its output folder (patch, one folder per format,
    report.json) and the report it printed. Several acceptance tests read this one run
    instead of each erasing the fixture again."""
    from helpers import run_cli

    out = tmp_path_factory.mktemp("demo") / "demo"
    return out, json.loads(run_cli("demo", "--out", str(out), "--json").stdout)
