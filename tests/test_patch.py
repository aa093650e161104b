"""The patch file: round trip, validation of corrupt files, and refusal of a foreign base."""

import json

import pytest
import torch
from safetensors.torch import save_file

from patcher.errors import PatcherError
from patcher.formats import checkpoint as checkpoint_module
from patcher.formats.checkpoint import Checkpoint, tensor_sha256
from patcher.formats.patch import Patch, PatchError, describe_choices


def make_patch(weight=None, delta=None):
    weight = torch.randn(4, 6) if weight is None else weight
    delta = torch.randn(4, 6) if delta is None else delta
    return Patch.from_deltas(
        {"layer.weight": delta},
        "memit",
        {"forget": []},
        {"layer.weight": tensor_sha256(weight)},
        {"layer.weight": "float32"},
    )


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    patch = make_patch()
    patch.save(tmp_path / "p.safetensors")
    loaded = Patch.load(tmp_path / "p.safetensors")
    assert loaded.method == "memit" and loaded.params == ["layer.weight"]
    assert loaded.base == patch.base and loaded.spec == {"forget": []}
    torch.testing.assert_close(loaded.delta("layer.weight"), patch.delta("layer.weight"))


def test_the_choices_erase_made_travel_with_the_patch(tmp_path):
    trace = {
        "retain_gate": 0.95,
        "seen_retain_facts": 60,
        "rungs": [
            {"margin": 1.0, "l2": 1.0, "erased": True, "kept": 0.9},
            {"margin": 0.5, "l2": 1.0, "erased": False, "kept": None},
            {"margin": 0.5, "l2": 4.0, "erased": True, "kept": 0.9667},
        ],
        "chosen": 2,
    }
    patch = Patch.from_deltas(
        {"w": torch.zeros(2, 2)}, "alphaedit", {}, {"w": "0" * 64}, choices={"layers": [0, 1], "calibration": trace}
    )
    patch.save(tmp_path / "p.safetensors")
    loaded = Patch.load(tmp_path / "p.safetensors")
    assert loaded.choices == {"layers": [0, 1], "calibration": trace}
    assert describe_choices(loaded.choices) == [
        "layers 0, 1",
        "calibration rung 3 of 3 (l2 4, margin 0.5): it kept 0.967 of the 60 retain facts erase sees (gate 0.95)",
    ]
    assert make_patch().choices == {} and describe_choices({}) == []


def test_low_rank_entries_give_b_at_a():
    a, b = torch.randn(2, 6), torch.randn(4, 2)
    patch = Patch({"w.lora_A": a, "w.lora_B": b}, "fila", {}, {"w": "0" * 64})
    torch.testing.assert_close(patch.delta("w"), b @ a)
    assert patch.rank("w") == 2


def test_apply_adds_delta_and_refuses_another_base():
    layer = torch.nn.Linear(6, 4, bias=False)
    model = torch.nn.Sequential()
    model.add_module("layer", layer)
    patch = make_patch(weight=layer.weight.detach().clone())
    before = layer.weight.detach().clone()
    patch.apply_to(model)
    torch.testing.assert_close(layer.weight.detach(), before + patch.delta("layer.weight"))
    with pytest.raises(PatchError, match="fingerprint mismatch"):
        patch.apply_to(model)  # the weight is no longer the base it was computed for


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: raw[: len(raw) // 2],  # truncated
        lambda raw: b"\xff" * 8 + raw[8:],  # header length past the end of the file
        lambda raw: b"not a safetensors file",  # garbage
    ],
)
def test_corrupt_files_are_one_line_errors(tmp_path, corrupt):
    path = tmp_path / "p.safetensors"
    make_patch().save(path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(PatchError, match="not a readable patch file") as info:
        Patch.load(path)
    assert "\n" not in str(info.value)


def test_metadata_problems_are_named(tmp_path):
    path = tmp_path / "p.safetensors"
    tensors = {"w.delta": torch.zeros(2, 2)}
    save_file(tensors, path, metadata={"method": "memit"})
    with pytest.raises(PatchError, match="lacks patch metadata 'patcher_version'"):
        Patch.load(path)
    metadata = {"patcher_version": "0", "method": "m", "spec": "{", "base": "{}", "created": "x"}
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(PatchError, match="'spec' is not valid JSON"):
        Patch.load(path)


def test_invalid_tensors_are_refused():
    base = {"w": "0" * 64}
    with pytest.raises(PatchError, match="must end in"):
        Patch({"w.weight": torch.zeros(2)}, "m", {}, base)
    with pytest.raises(PatchError, match="NaN or inf"):
        Patch({"w.delta": torch.tensor([float("nan")])}, "m", {}, base)
    with pytest.raises(PatchError, match="no matching"):
        Patch({"w.lora_A": torch.zeros(1, 2)}, "m", {}, base)
    with pytest.raises(PatchError, match="no base fingerprint"):
        Patch({"v.delta": torch.zeros(2)}, "m", {}, base)


def test_metadata_values_are_strings(tmp_path):
    make_patch().save(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(tmp_path / "p.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    assert set(json.loads(metadata["base"])) == {"layer.weight"}


def test_a_patched_weight_must_stay_finite_and_near_the_weight():
    weight = torch.randn(4, 6, dtype=torch.float16)
    with pytest.raises(PatchError, match="inf or NaN in float16"):
        make_patch(delta=torch.full((4, 6), 1e5)).patched("layer.weight", weight)  # past fp16's 65504
    with pytest.raises(PatchError, match="times the weight's norm"):
        make_patch(delta=1e4 * weight.float()).patched("layer.weight", weight.float())
    delta = 0.1 * torch.randn(4, 6)
    torch.testing.assert_close(
        make_patch(delta=delta).patched("layer.weight", weight), (weight.float() + delta).half()
    )


def test_a_patch_without_tensor_digests_still_loads(tmp_path):
    patch = make_patch()
    metadata = {k: v for k, v in patch.metadata().items() if k != "tensors_sha256"}  # as patcher wrote it before
    save_file(patch.tensors, tmp_path / "old.safetensors", metadata=metadata)
    torch.testing.assert_close(
        Patch.load(tmp_path / "old.safetensors").delta("layer.weight"), patch.delta("layer.weight")
    )


def test_the_whole_model_digest_samples_every_tensor(tmp_path):
    tensors = {"big": torch.randn(512, 1024), "small": torch.randn(3, 5)}  # 2 MiB: sampled in 16 windows
    for name in ("a", "b", "c", "d"):
        (tmp_path / name).mkdir()
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    save_file({k: v.clone() for k, v in tensors.items()}, tmp_path / "b" / "model.safetensors")
    changed_small = {**tensors, "small": tensors["small"] + 1}
    save_file(changed_small, tmp_path / "c" / "model.safetensors")
    changed_big = {**tensors, "big": tensors["big"].clone()}
    changed_big["big"][0, 0] += 1  # inside the first window
    save_file(changed_big, tmp_path / "d" / "model.safetensors")
    digests = [Checkpoint(tmp_path / name).model_digest() for name in ("a", "b", "c", "d")]
    assert digests[0] == digests[1] and len(set(digests)) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_shard_scan_finds_nan_or_inf_in_any_chunk(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(checkpoint_module, "SCAN_CHUNK_BYTES", 64)  # many chunks per tensor
    values = torch.randn(10, 30).to(dtype)
    save_file({"a": torch.randn(3, 3), "b": values}, tmp_path / "model.safetensors")
    Checkpoint(tmp_path).refuse_non_finite()  # all finite
    for bad in (float("nan"), float("inf")):
        broken = values.clone()
        broken[9, 29] = bad  # in the last chunk
        save_file({"a": torch.randn(3, 3), "b": broken}, tmp_path / "model.safetensors")
        with pytest.raises(PatcherError, match="b holds NaN or inf values"):
            Checkpoint(tmp_path).refuse_non_finite()
