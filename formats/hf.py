"""Write a Hugging Face model folder with a patch applied, one shard at a time."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from safetensors import safe_open

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.checkpoint import Checkpoint, refuse_non_finite, tensor_entries
from patcher.formats.outputs import mark_output
from patcher.formats.patch import Patch, PatchError
from patcher.formats.registry import ExportOptions, Target, register
from patcher.models import remote_code_trusted

# A model's own files besides its weights: configs (model, generation, processor, scheduler,
# pipeline index, shard index), tokenizer, chat template, remote code, card and licence.
# Nothing else beside the weights ships: a spec there names every erased fact and its answer,
# and a corpus or image set is the user's data, not the model's.
MODEL_FILE_ENDINGS = (
    "config.json", "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "chat_template.json", "model_index.json", ".safetensors.index.json", ".jinja", ".model", ".tiktoken", ".py",
)  # fmt: skip
MODEL_FILE_NAMES = frozenset({"merges.txt", "vocab.txt", "README.md", "LICENSE", "LICENSE.txt", "LICENSE.md"})


def check_patch_fits(checkpoint: Checkpoint, patch: Patch, force: bool = False) -> None:
    """Refuse a patch whose parameters are missing, whose shapes differ, or whose base
    fingerprints or whole-model digest differ (these two pass with a warning under `force`)."""
    missing = [p for p in patch.params if p not in checkpoint.shard_of]
    if missing:
        raise PatchError(f"{checkpoint.folder} has no tensor {missing[0]!r}: this patch is for another model")
    for param in patch.params:
        tensor = checkpoint.tensor(param)
        patch.check_shape(param, tensor)
        try:
            patch.check_base(param, tensor)
        except PatchError:
            if not force:
                raise
            warnings.warn(f"--force: applying to {param} although its fingerprint differs", stacklevel=2)
    if patch.base_model and checkpoint.model_digest() != patch.base_model:
        if not force:
            raise PatchError(
                f"{checkpoint.folder}'s other tensors differ from the base this patch was computed for "
                "(whole-model digest): apply it to its own base model, or pass --force"
            )
        warnings.warn("--force: applying although the model's whole-model digest differs", stacklevel=2)


def write_model_folder(source: str | Path, out: str | Path, patch: Patch | None = None, force: bool = False) -> Path:
    """Copy the model folder `source` to `out` with `patch` added to its weights.

    The model's own files (configs, tokenizer, card: `is_model_file`) are copied as they are,
    nothing else (a spec or corpus beside the weights stays behind); weights are rewritten
    shard by shard in their stored dtype, so peak memory is about one shard plus the
    patch. The folder appears at `out` only when complete.
    """
    checkpoint = Checkpoint(source)
    if patch is not None:
        check_patch_fits(checkpoint, patch, force)
    with atomic_path(out, is_dir=True) as tmp:
        _copy_side_files(checkpoint, tmp)
        for shard in checkpoint.shards:
            dest = tmp / shard.relative_to(checkpoint.folder)
            _write_shard(checkpoint, shard, dest, patch, force)
        mark_output(tmp, written_by(patch))
    return Path(out)


def written_by(patch: Patch | None) -> dict:
    """A patched folder's `patcher.json`: the patch's metadata but the spec (which lists every
    erased fact); an unpatched one's: the patcher version."""
    if patch is None:
        from patcher import __version__

        return {"patcher_version": __version__}
    return {k: v for k, v in patch.metadata().items() if k != "spec"}


def _copy_side_files(checkpoint: Checkpoint, dest: Path) -> None:
    """The model's own files but the weights (recursively: a pipeline's components are folders)."""
    weights = set(checkpoint.shards)
    for item in sorted(checkpoint.folder.rglob("*")):
        relative = item.relative_to(checkpoint.folder)
        if item in weights or any(part.startswith(".") for part in relative.parts) or not is_model_file(item):
            continue
        _refuse_outside_link(item, checkpoint.folder)
        if item.is_file():
            (dest / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, dest / relative)


def is_model_file(path: Path) -> bool:
    """Whether `path` is one of a model's own files that ships beside its weights."""
    return path.name in MODEL_FILE_NAMES or path.name.endswith(MODEL_FILE_ENDINGS)


def _refuse_outside_link(path: Path, folder: Path) -> None:
    """A symlink may point inside the model folder, or into the blobs of the Hugging Face
    cache repository the folder is a snapshot of; anything else is refused, never copied."""
    if not path.is_symlink():
        return
    target, root = path.resolve(), folder.resolve()
    roots = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(allowed) for allowed in roots):
        raise PatcherError(f"{path} links outside the model folder (to {target}): copy the file into the folder")


def _write_shard(checkpoint: Checkpoint, source: Path, dest: Path, patch: Patch | None, force: bool) -> None:
    """Copy one shard byte for byte, then overwrite in place the tensors the patch changes
    (named `<component>/<name>` in a pipeline): a patched tensor keeps its dtype and shape,
    so its bytes keep their place. The shard is scanned for NaN or inf first, in chunks;
    memory holds one patched tensor at a time."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.refuse_non_finite(source)
    shutil.copyfile(source, dest)
    if patch is None:
        return
    offsets, prefix = _tensor_offsets(source), checkpoint.prefix_of[source]
    patched = [name for name in offsets if prefix + name in patch.params]
    with safe_open(source, framework="pt") as f, dest.open("r+b") as out:
        for name in patched:
            tensor = f.get_tensor(name)
            updated = patch.patched(prefix + name, tensor, force).contiguous()
            out.seek(offsets[name])
            out.write(memoryview(updated.reshape(-1).view(torch.uint8).numpy()))


def _tensor_offsets(shard: Path) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file."""
    entries, data_start = tensor_entries(shard)
    return {name: data_start + entry["data_offsets"][0] for name, entry in entries.items()}


def load_causal_lm(folder: Path):
    """Plain transformers, as a user loads the exported safetensors folder; NaN or inf refused."""
    from transformers import AutoModelForCausalLM

    Checkpoint(folder)  # refuses a folder without safetensors weights before transformers reads a pickle
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto", trust_remote_code=remote_code_trusted()).eval()
    refuse_non_finite(model.named_parameters(), folder)
    return model


def _load_pipeline(folder: Path):
    from patcher.models import load_pipeline

    return load_pipeline(folder)


def _load_classifier(folder: Path):
    from patcher.models import load_classifier

    return load_classifier(folder)


def _export(source: Path, out: Path, patch: Patch | None, options: ExportOptions) -> None:
    write_model_folder(source, out, patch, options.force)


register(
    Target("safetensors", "causal-lm", _export, load_causal_lm, load_causal_lm,
           'AutoModelForCausalLM.from_pretrained("{path}")'),
    Target("safetensors", "t2i-unet", _export, _load_pipeline, _load_pipeline,
           'DiffusionPipeline.from_pretrained("{path}")'),
    Target("safetensors", "classifier", _export, _load_classifier, _load_classifier,
           'AutoModelForImageClassification.from_pretrained("{path}")'),
)  # fmt: skip
