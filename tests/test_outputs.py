"""`--out` never destroys data: not the input model, not a folder or file patcher did not
write; `--overwrite` replaces only an earlier output of patcher."""

import errno
import hashlib
from pathlib import Path

import pytest
from helpers import run_cli
from safetensors import SafetensorError

from patcher.fixtures.architectures import write_tiny_lm


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs") / "model"
    write_tiny_lm("llama", folder)
    return folder


def tree_digest(path: Path) -> str:
    """One digest of every file's relative path and bytes under `path` (or of the file)."""
    digest = hashlib.sha256()
    for item in sorted([path] if path.is_file() else path.rglob("*")):
        if item.is_file():
            digest.update(str(item.relative_to(path.parent)).encode() + item.read_bytes())
    return digest.hexdigest()


def export(model: Path, out: Path, *extra: str, expect: int | None):
    return run_cli("export", str(model), "--to", "safetensors", "--out", str(out), *extra, expect=expect)


def assert_refused(result, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.parametrize("overwrite", [(), ("--overwrite",)])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_existing_path_patcher_did_not_write_is_left_byte_identical(model, tmp_path, kind, overwrite):
    out = tmp_path / "out"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("someone's work\n")
    else:
        out.write_text("someone's work\n")
    before = tree_digest(out)
    fragment = "was not written by patcher" if overwrite else "already exists"
    assert_refused(export(model, out, *overwrite, expect=2), fragment)
    assert tree_digest(out) == before


@pytest.mark.parametrize("where", ["the model", "inside the model"])
def test_an_output_overlapping_the_input_is_refused_even_with_overwrite(model, where):
    out = model if where == "the model" else model / "patched"
    before = tree_digest(model)
    assert_refused(export(model, out, "--overwrite", expect=2), "overlaps the input")
    assert tree_digest(model) == before and not (model / "patched").exists()


def test_overwrite_replaces_an_earlier_output_of_patcher(model, tmp_path):
    out = tmp_path / "out"
    export(model, out, expect=0)
    assert (out / "patcher.json").is_file()
    assert_refused(export(model, out, expect=2), "already exists")
    (out / "stale.txt").write_text("from the earlier run\n")
    export(model, out, "--overwrite", expect=0)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def failing(err: Exception):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.mark.parametrize(
    "where, err, fragment",
    [
        ("shutil.copyfile", OSError(errno.ENOSPC, "No space left", "shard"), "shard: no space left on the device"),
        ("tempfile.mkdtemp", OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        ("shutil.copyfile", SafetensorError("IoError(Os { code: 28 })"), "no space left on the device"),
    ],
)
def test_io_failures_are_one_line_exit_2_and_leave_nothing(model, tmp_path, monkeypatch, where, err, fragment):
    """A full or read-only disk, as the OS or safetensors reports it, mid-way through an export."""
    module, name = where.split(".")
    monkeypatch.setattr(f"{module}.{name}", failing(err))
    out = tmp_path / "out"
    result = export(model, out, expect=None)
    assert_refused(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary


def test_a_crash_is_exit_3_with_its_traceback_and_leaves_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.copyfile", failing(RuntimeError("boom")))
    result = export(model, tmp_path / "out", expect=3)
    assert "Traceback" in result.stderr and "RuntimeError: boom" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: patcher crashed (a bug, not bad input)")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
