"""What a patched folder ships: the model's own files, never the spec, corpus or data that sit
beside the weights, and nothing a symlink reaches outside the folder."""

from pathlib import Path

import pytest
from helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.fixtures.architectures import write_tiny_lm


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A tiny Llama with its spec and corpus beside the weights, as the fixtures lay them out,
    plus a licence, a model card and an image set."""
    folder = tmp_path / "model"
    write_tiny_lm("llama", folder)
    (folder / "LICENSE").write_text("licence\n")
    (folder / "README.md").write_text("# card\n")
    (folder / "data").mkdir()
    (folder / "data" / "train.safetensors").write_bytes(b"user data")
    return folder


def shipped(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def test_export_ships_the_models_files_and_not_the_spec_corpus_or_data(model_folder, tmp_path):
    assert {"spec.toml", "corpus.txt"} <= shipped(model_folder)
    out = tmp_path / "out"
    run_cli("export", str(model_folder), "--to", "safetensors", "--out", str(out))
    files = shipped(out)
    own = {"config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors", "LICENSE", "README.md"}
    assert own <= files
    assert not files & {"spec.toml", "corpus.txt", "data/train.safetensors"}
    # What ships is all transformers needs.
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)


def test_a_model_file_linking_outside_the_folder_is_refused(model_folder, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "s3cret"}\n')
    (model_folder / "added_tokens.json").symlink_to(secret)
    out = tmp_path / "out"
    result = run_cli("export", str(model_folder), "--to", "safetensors", "--out", str(out), expect=2)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "links outside the model folder" in lines[0], result.stderr
    assert not out.exists()
