"""The compatibility matrix on a representative subset of families, run as its script is
(slow: every step of patcher on five tiny models, about a minute each)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from patcher.formats.llama_cpp import ARCHITECTURES as GGUF_ARCHITECTURES
from patcher.verification.optimum import optimum_python

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
# Sequential (Llama), Conv1D (GPT-2), flattened tokens (OPT), parallel attention (Phi), experts (Mixtral).
SUBSET = ("llama", "gpt2", "opt", "phi", "mixtral")


def test_every_step_passes_or_is_refused_in_one_line(tmp_path):
    out = tmp_path / "families.csv"
    command = [sys.executable, "bench/families.py", "--families", ",".join(SUBSET), "--out", str(out)]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True)
    rows = {row.pop("family"): row for row in csv.DictReader(out.open())}
    assert list(rows) == list(SUBSET)
    for family, row in rows.items():
        row.pop("seconds")
        cells = set(row.values())
        if family == "mixtral":
            assert all(cell.startswith("refused: ") and "\n" not in cell for cell in cells), row
            assert "mixture-of-experts" in row["memit"]
        else:
            failed = {step: cell for step, cell in row.items() if cell != "pass"}
            generated = failed.pop("optimum", "pass")
            if optimum_python() is None:
                assert generated.startswith("skipped: ")
            elif family == "phi":  # optimum reads grouped-query heads only for the model types it lists
                assert "past_key_values." in generated and "Got: 4 Expected: 2" in generated
            else:
                assert generated == "pass", (family, generated)
            if family not in GGUF_ARCHITECTURES:  # the GGUF export writes llama.cpp's layouts of a few families
                refusal = f"refused: gguf export covers {', '.join(GGUF_ARCHITECTURES)}"
                assert failed.pop("gguf-q4_0", "").startswith(refusal), (family, failed)
            if family == "gpt2":  # compressed-tensors packs nn.Linear only, not GPT-2's Conv1D
                assert failed.pop("int4", "").startswith("refused: transformer.h.0.attn.c_attn is a Conv1D")
            assert not failed, (family, failed)
