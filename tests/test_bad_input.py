"""Bad patch files: each defect is one line and exit 2 from apply, export and inspect, with
nothing written; and a fuzz test that the patch reader never fails any other way."""

import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save_file

from patcher.formats.checkpoint import Checkpoint
from patcher.formats.patch import Patch, PatchError

PARAM = "model.layers.1.mlp.down_proj.weight"


def valid_patch(fixture: Path) -> Patch:
    checkpoint = Checkpoint(fixture)
    delta = torch.full_like(checkpoint.tensor(PARAM), 1e-3)
    return Patch.from_deltas({PARAM: delta}, "memit", {}, checkpoint.fingerprints([PARAM]))


def handmade(patch: Patch) -> dict[str, str]:
    """The patch's metadata without its tensor digests, as a file written by other code carries."""
    return {k: v for k, v in patch.metadata().items() if k != "tensors_sha256"}


def raw_safetensors(header: str, data: bytes) -> bytes:
    encoded = header.encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def truncated(patch: Patch, path: Path) -> None:
    patch.save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def header_past_the_end(patch: Patch, path: Path) -> None:
    patch.save(path)
    path.write_bytes(struct.pack("<Q", 10**9) + path.read_bytes()[8:])


def integer_delta(patch: Patch, path: Path) -> None:
    save_file({f"{PARAM}.delta": patch.delta(PARAM).to(torch.int32)}, path, metadata=handmade(patch))


def wrong_shape(patch: Patch, path: Path) -> None:
    save_file({f"{PARAM}.delta": torch.zeros(3, 5)}, path, metadata=handmade(patch))


def metadata_not_json(patch: Patch, path: Path) -> None:
    save_file(patch.tensors, path, metadata={**patch.metadata(), "base": "{not json"})


def duplicated_name(patch: Patch, path: Path) -> None:
    entry = json.dumps({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})
    metadata = json.dumps(patch.metadata())
    header = f'{{"{PARAM}.delta": {entry}, "{PARAM}.delta": {entry}, "__metadata__": {metadata}}}'
    path.write_bytes(raw_safetensors(header, bytes(16)))


def nan_delta(patch: Patch, path: Path) -> None:
    save_file({f"{PARAM}.delta": torch.full_like(patch.delta(PARAM), float("nan"))}, path, metadata=handmade(patch))


def flipped_byte(patch: Patch, path: Path) -> None:
    patch.save(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # the last tensor's data, header intact: still a finite float
    path.write_bytes(bytes(data))


def absurd_delta(patch: Patch, path: Path) -> None:
    Patch.from_deltas({PARAM: torch.full_like(patch.delta(PARAM), 1e30)}, "memit", {}, patch.base).save(path)


DEFECTS = {
    truncated: "not a readable patch file",
    header_past_the_end: "header claims 1000000000 bytes",
    integer_delta: "has dtype torch.int32",
    wrong_shape: "has shape",
    metadata_not_json: "'base' is not valid JSON",
    duplicated_name: "appears twice",
    nan_delta: "NaN or inf",
    flipped_byte: "differ from its digest",
    absurd_delta: "times the weight's norm",
}
FOR_A_MODEL = (wrong_shape, absurd_delta)  # defects that only a model reveals; inspect reads the file alone


def assert_one_line_exit_2(result, message: str) -> None:
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("defect", list(DEFECTS), ids=lambda d: d.__name__)
def test_each_defect_is_one_line_exit_2_and_nothing_is_written(lm_fixture, tmp_path, defect):
    bad = tmp_path / "bad.safetensors"
    defect(valid_patch(lm_fixture), bad)
    message = DEFECTS[defect]
    assert_one_line_exit_2(run_cli("apply", str(lm_fixture), str(bad), "--out", str(tmp_path / "a"), expect=None),
                           message)  # fmt: skip
    export = ["export", str(lm_fixture), "--to", "safetensors", "--patch", str(bad), "--out", str(tmp_path / "e")]
    assert_one_line_exit_2(run_cli(*export, expect=None), message)
    if defect not in FOR_A_MODEL:
        assert_one_line_exit_2(run_cli("inspect", str(bad), expect=None), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors"]  # no output, no temporary


@pytest.fixture(scope="module")
def valid_bytes() -> bytes:
    patch = Patch.from_deltas({"w": torch.randn(3, 4)}, "memit", {"forget": []}, {"w": "0" * 64})
    with tempfile.TemporaryDirectory() as folder:
        return patch.save(Path(folder) / "p.safetensors").read_bytes()


positions = st.integers(0, 10_000)
mutations = st.one_of(
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("flip"), st.lists(st.tuples(positions, st.integers(0, 255)), min_size=1, max_size=8)),
    st.tuples(st.just("insert"), positions, st.binary(min_size=1, max_size=16)),
)


def mutate(raw: bytes, mutation) -> bytes:
    kind, *args = mutation
    if kind == "truncate":
        return raw[: args[0] % (len(raw) + 1)]
    data = bytearray(raw)
    if kind == "flip":
        for position, value in args[0]:
            data[position % len(data)] = value
        return bytes(data)
    position, inserted = args
    return bytes(data[: position % len(data)] + inserted + data[position % len(data) :])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=mutations)
def test_a_mutated_patch_file_loads_unchanged_or_fails_in_one_line(valid_bytes, mutation):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        path.write_bytes(mutate(valid_bytes, mutation))
        try:
            patch = Patch.load(path)
        except PatchError as err:
            assert "\n" not in str(err)
            return
    original = load(valid_bytes)  # the digests let only unchanged tensor bytes through
    assert patch.tensors.keys() == original.keys()
    assert all(torch.equal(patch.tensors[name], tensor) for name, tensor in original.items())


def test_force_never_broadcasts_a_delta_but_applies_an_absurd_one_with_a_warning(lm_fixture, tmp_path):
    bad = tmp_path / "bad.safetensors"
    wrong_shape(valid_patch(lm_fixture), bad)
    result = run_cli("apply", str(lm_fixture), str(bad), "--out", str(tmp_path / "a"), "--force", expect=None)
    assert_one_line_exit_2(result, "has shape")
    assert not (tmp_path / "a").exists()
    absurd_delta(valid_patch(lm_fixture), bad)
    forced = run_cli("apply", str(lm_fixture), str(bad), "--out", str(tmp_path / "b"), "--force")
    assert "times the weight's norm" in forced.stderr and (tmp_path / "b" / "model.safetensors").is_file()
