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
from safetensors import safe_open
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


def dtype_not_a_dtype(patch: Patch, path: Path) -> None:
    named = {f"{PARAM}\nsecond line": "Tensor"}  # the message names it on one line all the same
    save_file(patch.tensors, path, metadata={**handmade(patch), "base_dtypes": json.dumps(named)})


def deeply_nested_metadata(patch: Patch, path: Path) -> None:
    save_file(patch.tensors, path, metadata={**handmade(patch), "spec": "[" * 100_000 + "]" * 100_000})


def rank_zero_pair(patch: Patch, path: Path) -> None:
    pair = {f"{PARAM}.lora_A": torch.zeros(0, 512), f"{PARAM}.lora_B": torch.zeros(128, 0)}
    save_file(pair, path, metadata=handmade(patch))


def terabyte_pair(patch: Patch, path: Path) -> None:
    pair = {f"{PARAM}.lora_A": torch.zeros(1, 2**20), f"{PARAM}.lora_B": torch.zeros(2**13, 1)}  # 2^33 elements
    save_file(pair, path, metadata=handmade(patch))


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
    dtype_not_a_dtype: "which is not a torch dtype",
    deeply_nested_metadata: "nested too deeply",
    rank_zero_pair: "has rank 0",
    terabyte_pair: "more than any model's matrix",
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
        with safe_open(path, "pt") as loaded:
            digested = "tensors_sha256" in (loaded.metadata() or {})
    if not digested:  # the mutation hit the digests' key: a patch without digests loads, as other code writes them
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


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
metadata_values = st.one_of(
    json_values.map(json.dumps),
    st.text(max_size=40),
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),
    st.dictionaries(st.just("w"), st.sampled_from(["float32", "bfloat16", "int8", "Tensor", "", "float"])).map(
        json.dumps
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["spec", "base", "base_dtypes", "tensors_sha256", "method"]), value=metadata_values)
def test_any_metadata_value_loads_or_fails_in_one_line(valid_bytes, key, value):
    """Metadata fuzz: nesting, sizes and dtypes that patcher never writes are refused in one line."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.safetensors"
        save_file(load(valid_bytes), path, metadata={**_metadata_of(valid_bytes), key: value})
        try:
            Patch.load(path)
        except PatchError as err:
            assert "\n" not in str(err)


def _metadata_of(raw: bytes) -> dict[str, str]:
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length])["__metadata__"]
