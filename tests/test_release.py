"""`patcher release`: every artifact exported and verified, card and HTML report written, reruns
resume, a failing method exits 1 naming the format, and the report renders in a browser."""

import json
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from helpers import reduced_spec, run_cli
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from patcher.models import model_fingerprint
from patcher.spec import dump_spec


@pytest.fixture(scope="module")
def lm_release(lm_fixture, tmp_path_factory):
    """The LM fixture's spec with peft and onnx as [export] extras, released once."""
    spec = tomllib.loads((lm_fixture / "spec.toml").read_text())
    spec["export"] = {"formats": ["int4", "peft", "onnx"]}
    (lm_fixture / "release.toml").write_text(dump_spec(spec))
    out = tmp_path_factory.mktemp("release") / "out"
    result = run_cli("release", str(lm_fixture / "release.toml"), "--out", str(out), "--json", expect=None)
    return out, result


@pytest.mark.slow
def test_lm_release_exports_verifies_and_documents_every_format(lm_fixture, lm_release):
    out, result = lm_release
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    report = json.loads((out / "report.json").read_text())
    assert summary["passed"] and report["passed"] and not summary["failing"]
    verified = set(report["formats"])
    assert {"safetensors", "int8", "nf4", "fp4", "int4", "onnx", "peft"} <= verified  # every artifact, all passed
    assert all(row["passed"] and row["recovery"] <= 0.05 for row in report["formats"].values())
    for fmt in ("safetensors", "int8", "nf4", "fp4", "onnx", "peft"):
        assert (out / "artifacts" / fmt).is_dir()
    # the artifacts load with their own libraries, no patcher needed
    AutoModelForCausalLM.from_pretrained(out / "artifacts" / "int8", device_map="cpu")
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm_fixture), out / "artifacts" / "peft")

    card = (out / "README.md").read_text()
    assert report["base_fingerprint"] in card and "recovery" in card
    assert "- Erase chose layers " in card and "- Erase chose calibration rung " in card
    for fmt, row in report["formats"].items():  # recovery named per format in the matrix
        assert f"| {fmt} | {row['forget_accuracy']:.3f} |" in card and f"{row['recovery']:.3f}" in card
    assert "PeftModel.from_pretrained" in card and "ORTModelForCausalLM.from_pretrained" in card
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page


@pytest.mark.slow
def test_a_rerun_skips_every_finished_stage(lm_fixture, lm_release):
    out, _ = lm_release
    before = (out / "patch.safetensors").stat().st_mtime_ns
    rerun = run_cli("release", str(lm_fixture / "release.toml"), "--out", str(out), "--json")
    skipped = json.loads(rerun.stdout)["skipped_stages"]
    assert {"erase", "verify", "export safetensors", "export nf4", "export peft"} <= set(skipped)
    assert (out / "patch.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_rerun_redoes_what_a_changed_input_or_a_damaged_artifact_touches(lm_fixture, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(lm_fixture, base)
    spec = tomllib.loads((lm_fixture / "spec.toml").read_text())
    spec["verify"]["formats"] = ["safetensors", "int8"]
    (base / "small.toml").write_text(dump_spec(spec))
    out = tmp_path / "out"

    def rerun() -> set[str]:
        result = run_cli("release", str(base / "small.toml"), "--out", str(out), "--json", expect=None)
        return set(json.loads(result.stdout)["skipped_stages"])

    rerun()
    every = {"erase", "export safetensors", "export int8", "verify"}
    assert rerun() == every
    shipped = out / "artifacts" / "int8" / "model.safetensors"
    verified = shipped.read_bytes()
    shipped.write_bytes(verified[:-10])  # truncated after the release
    assert rerun() == every - {"export int8"}  # the verify stands: the export wrote the same bytes again
    assert shipped.read_bytes() == verified
    with (base / "corpus.txt").open("a") as corpus:
        corpus.write("One more sentence the statistics must now see.\n")
    assert rerun() == set()  # a new patch, so every export and the verify again
    weights = load_file(base / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.01  # a tensor no edit touches
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    assert "erase" not in rerun()
    report = json.loads((out / "report.json").read_text())
    assert report["base_fingerprint"] == model_fingerprint(base)


def test_a_release_whose_gates_fail_exits_1_and_names_the_format(lm_fixture, tmp_path):
    spec = tomllib.loads((lm_fixture / "spec.toml").read_text())
    spec["erase"] = {"method": "ga", "layers": spec["erase"]["layers"]}
    spec["verify"]["formats"] = ["safetensors", "int8"]
    spec["attacks"] = {"probe": {"steps": 100}}
    (lm_fixture / "ga.toml").write_text(dump_spec(spec))
    result = run_cli("release", str(lm_fixture / "ga.toml"), "--out", str(tmp_path / "ga"), expect=1)
    failing = [line for line in result.stdout.splitlines() if line.startswith("release FAILED in")]
    assert failing and "safetensors" in failing[0]
    card = (tmp_path / "ga" / "README.md").read_text()
    assert "FAIL" in card
    # The spec's attack ran, with its budget in the card and a plot per layer in the page.
    probe = json.loads((tmp_path / "ga" / "report.json").read_text())["attacks"]["probe"]
    assert probe["budget"]["steps"] == 100 and "| attack: probe |" in card and "budget: steps 100" in card
    assert (tmp_path / "ga" / "report.html").read_text().count("data:image/png;base64,") == 4


def test_bad_release_input_is_one_line_and_exit_2(lm_fixture, tmp_path):
    spec = tomllib.loads((lm_fixture / "spec.toml").read_text())
    spec["export"] = {"formats": ["gguf"]}
    (tmp_path / "bad.toml").write_text(dump_spec(spec).replace('path = "."', f'path = "{lm_fixture}"'))
    result = run_cli("release", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "r"), expect=2)
    assert "unknown format 'gguf'" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "r").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed")
def test_the_html_report_renders_in_headless_chromium(lm_release, tmp_path):
    out, _ = lm_release
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
               (out / "report.html").resolve().as_uri()]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert 'data-images-ok="true"' in result.stdout  # every embedded plot decoded
    assert "patcher release" in result.stdout


@pytest.mark.slow
def test_diffusion_release_writes_the_pipeline_and_an_image_grid(diffusion_fixture, tmp_path):
    out = tmp_path / "sd"
    result = run_cli("release", reduced_spec(diffusion_fixture, tmp_path), "--out", str(out), "--json", expect=None)
    summary = json.loads(result.stdout)
    # Whether RECE passes every gate depends on the fixture's build (issue 25, and
    # test_t2i's test of it); the release must say which way it went and write everything.
    assert result.returncode == (0 if summary["passed"] else 1)
    assert summary["passed"] == (not summary["failing"])
    assert {"safetensors", "int8", "nf4"} <= set(summary["formats"])
    assert (out / "artifacts" / "safetensors" / "model_index.json").is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4  # accuracy, recovery, the inversion attack, the image grid
    assert "attack" in (out / "README.md").read_text()


def test_release_runs_from_python(lm_fixture):
    from patcher.releasing import prepare

    release = prepare(lm_fixture / "spec.toml", Path("unused"))
    assert release.family.name == "causal-lm" and release.robust_to == ("int8", "nf4", "fp4")
