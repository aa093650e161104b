"""Read the weights of a Hugging Face folder tensor by tensor: a model, single-file or
sharded, or a diffusers pipeline, whose components' tensors are named `<component>/<name>`."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from patcher.errors import PatcherError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# diffusers' own models (UNet, VAE) use this stem; transformers components use "model".
WEIGHT_STEMS = ("model", "diffusion_pytorch_model")
PIPELINE_INDEX = "model_index.json"
SAMPLE_WINDOWS, SAMPLE_WINDOW_BYTES = 16, 4096  # the whole-model digest's sample of each tensor
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SCAN_CHUNK_BYTES = 4 * 2**20  # the NaN scan reads shards in chunks this size: no mmap, no tensor copies


class Checkpoint:
    """The safetensors weights of one model folder: which tensor lives in which shard.

    Opening reads only headers; `tensor(name)` reads one tensor. That is what keeps apply
    and fingerprinting streaming: a 70B checkpoint is never in memory at once.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.shard_of: dict[str, Path] = {}  # tensor name -> shard file
        self.prefix_of: dict[Path, str] = {}  # shard file -> "" or "<component>/"
        components = _pipeline_components(self.folder)
        for component in components or [""]:
            self._add_weights(self.folder / component, f"{component}/" if component else "")
        if not self.shard_of:
            pickles = sorted(p.name for p in self.folder.rglob("*.bin"))
            found = f" (only {', '.join(pickles[:2])}: pickle, which patcher never reads)" if pickles else ""
            raise PatcherError(
                f"{self.folder} holds no {SINGLE_FILE} or {INDEX_FILE}{found}: "
                "load it yourself and save it with save_pretrained(..., safe_serialization=True)"
            )

    def _add_weights(self, folder: Path, prefix: str) -> None:
        for stem in WEIGHT_STEMS:
            index, single = folder / f"{stem}.safetensors.index.json", folder / f"{stem}.safetensors"
            for path in (index, single):
                if path.is_symlink() and not path.exists():
                    raise PatcherError(
                        f"{path} is a link that leads nowhere (broken, or a loop): point it at the file"
                    )
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                shards = {name: folder / shard for name, shard in weight_map.items()}
                missing = sorted({shard.name for shard in shards.values() if not shard.is_file()})
                if missing:
                    raise PatcherError(
                        f"{folder} is missing {', '.join(missing)}, which {index.name} lists: "
                        "copy or download the complete checkpoint"
                    )
            elif single.is_file():
                shards = dict.fromkeys(_checked_entries(single), single)
            else:
                continue
            for shard in set(shards.values()) - {single}:
                _checked_entries(shard)
            for name, shard in shards.items():
                self.shard_of[prefix + name] = shard
                self.prefix_of[shard] = prefix
            return

    @property
    def shards(self) -> list[Path]:
        """Shard files in a stable order."""
        return sorted(set(self.shard_of.values()))

    def names(self, shard: Path | None = None) -> list[str]:
        return sorted(n for n, s in self.shard_of.items() if shard is None or s == shard)

    def tensor(self, name: str) -> torch.Tensor:
        shard = self.shard_of[name]
        with safe_open(shard, framework="pt") as f:
            return f.get_tensor(name.removeprefix(self.prefix_of[shard]))

    def fingerprints(self, names: Iterable[str]) -> dict[str, str]:
        """sha256 of each named tensor's bytes exactly as stored (dtype and layout)."""
        return {name: tensor_sha256(self.tensor(name)) for name in names}

    def refuse_non_finite(self, shard: Path | None = None) -> None:
        """One line naming the first tensor (of `shard`, or of every shard) holding NaN or inf,
        read in SCAN_CHUNK_BYTES chunks so that memory stays flat whatever the shard's size."""
        for path in [shard] if shard is not None else self.shards:
            entries, data_start = tensor_entries(path)
            with path.open("rb") as f:
                for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"][0]):
                    dtype = SAFETENSORS_FLOATS.get(entry["dtype"])
                    if dtype is not None and not _finite_bytes(f, data_start, entry["data_offsets"], dtype):
                        raise _non_finite(self.prefix_of[path] + name, path)

    def model_digest(self) -> str:
        """sha256 over every tensor's name, dtype, shape and up to SAMPLE_WINDOWS windows of
        its stored bytes: what tells another fine-tune of the same architecture apart while
        reading 64 KiB per tensor, whatever the model's size."""
        digest = hashlib.sha256()
        for shard in self.shards:
            entries, data_start = tensor_entries(shard)
            with shard.open("rb") as f:
                for name in sorted(entries):
                    entry = entries[name]
                    digest.update(f"{self.prefix_of[shard]}{name}:{entry['dtype']}:{entry['shape']};".encode())
                    begin, end = entry["data_offsets"]
                    for start in _window_starts(end - begin):
                        f.seek(data_start + begin + start)
                        digest.update(f.read(min(SAMPLE_WINDOW_BYTES, end - begin - start)))
        return digest.hexdigest()


def refuse_non_finite(tensors: Iterable[tuple[str, torch.Tensor]], where: str | Path) -> None:
    """One line naming the first floating-point tensor that holds NaN or inf: a corrupt
    checkpoint is never edited, measured or shipped."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise _non_finite(name, where)


def _non_finite(name: str, where: str | Path) -> PatcherError:
    return PatcherError(f"{where}: {name} holds NaN or inf values: the checkpoint is corrupt; restore it first")


def _finite_bytes(f, data_start: int, offsets: list[int], dtype: torch.dtype) -> bool:
    """Whether the tensor stored at `offsets` in the open file `f` holds only finite values."""
    begin, end = offsets
    f.seek(data_start + begin)
    step = SCAN_CHUNK_BYTES - SCAN_CHUNK_BYTES % dtype.itemsize
    for start in range(begin, end, step):
        chunk = bytearray(f.read(min(step, end - start)))
        if chunk and not torch.isfinite(torch.frombuffer(chunk, dtype=dtype)).all():
            return False
    return True


def _checked_entries(shard: Path) -> dict[str, dict]:
    """A shard's tensor entries, after checking that its header reads and its file holds every
    byte the header describes: a truncated download is one line, not a SafetensorError."""
    try:
        entries, data_start = tensor_entries(shard)
    except (ValueError, OSError) as err:
        raise PatcherError(f"{shard} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    described = data_start + max((entry["data_offsets"][1] for entry in entries.values()), default=0)
    size = shard.stat().st_size
    if described > size:
        raise PatcherError(
            f"{shard} is truncated: its header describes {described} bytes, the file holds {size}; copy it again"
        )
    return entries


def tensor_entries(shard: Path) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (dtype, shape, data_offsets) and where its data starts."""
    header, data_start = safetensors_header(shard)
    entries = json.loads(header)
    entries.pop("__metadata__", None)
    return entries, data_start


def _window_starts(size: int) -> list[int]:
    """Offsets of SAMPLE_WINDOWS evenly spread windows in `size` bytes (one, whole, when small)."""
    if size <= SAMPLE_WINDOWS * SAMPLE_WINDOW_BYTES:
        return list(range(0, size, SAMPLE_WINDOW_BYTES))
    step = (size - SAMPLE_WINDOW_BYTES) / (SAMPLE_WINDOWS - 1)
    return [round(i * step) for i in range(SAMPLE_WINDOWS)]


def safetensors_header(path: Path) -> tuple[bytes, int]:
    """The raw JSON header of a safetensors file and the byte offset where its data starts;
    ValueError when the file is too short or its header length runs past the end."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or length > size - 8:
            raise ValueError(f"its header claims {length} bytes, the file holds {max(size - 8, 0)}")
        return f.read(length), 8 + length


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes; independent of the dtype's numpy support."""
    flat = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy().tobytes()).hexdigest()


def _pipeline_components(folder: Path) -> list[str]:
    """The component folders of a diffusers pipeline (unet, text_encoder, ...); [] for a model."""
    index = folder / PIPELINE_INDEX
    if not index.is_file():
        return []
    entries = json.loads(index.read_text())
    return sorted(
        name
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and value[0] is not None and (folder / name).is_dir()
    )
