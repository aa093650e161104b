"""Finding and loading models: local Hugging Face folders or hub ids."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch

from patcher.errors import PatcherError
from patcher.formats.checkpoint import Checkpoint, refuse_non_finite


def in_checkpoint_names(model, deltas: dict) -> dict:
    """`deltas` keyed by the tensor names of the model's checkpoint files, where a patch applies.

    transformers (5 and later) may rename tensors on load (ViT's `encoder.layer.0.intermediate.dense`
    is `layers.0.mlp.fc1` in the module tree) and renames them back on save; the names here are
    the ones `save_pretrained` writes. A tensor that loading builds from several checkpoint
    tensors (fused experts, say) has no single name to patch: one line, and the patch is refused.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers before 5 loads checkpoints under their own names
        return deltas
    parameters = {name: model.get_parameter(name) for name in deltas}
    saved_as = {id(tensor): name for name, tensor in revert_weight_conversion(model, dict(parameters)).items()}
    missing = [name for name, tensor in parameters.items() if id(tensor) not in saved_as]
    if missing:
        raise PatcherError(
            f"{missing[0]} is stored in the checkpoint combined with other tensors: patcher cannot "
            "patch it; edit other layers"
        )
    return {saved_as[id(parameters[name])]: delta for name, delta in deltas.items()}


_REMOTE_CODE: ContextVar[bool] = ContextVar("patcher_trust_remote_code", default=False)


@dataclass(frozen=True)
class HubAccess:
    """How hub ids are fetched; None leaves huggingface_hub's own default (main, the cache
    under HF_HOME, the HF_TOKEN environment variable)."""

    revision: str | None = None
    cache_dir: Path | None = None
    token: str | None = None


_HUB_ACCESS: ContextVar[HubAccess | None] = ContextVar("patcher_hub_access", default=None)


@contextmanager
def _setting(variable: ContextVar, value) -> Iterator[None]:
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def remote_code(trusted: bool):
    """Within the block, a model folder that ships its own code (`auto_map` in config.json) is
    downloaded with it and every loader runs it, when `trusted`; otherwise it is refused.

    One switch per command rather than a flag on every loader: export, verify and release load
    the same model through a dozen consumers, and each must follow the user's single choice.
    """
    return _setting(_REMOTE_CODE, trusted)


def remote_code_trusted() -> bool:
    """Whether loaders may run a model's own code: the innermost `remote_code` block's choice."""
    return _REMOTE_CODE.get()


def hub_access(access: HubAccess):
    """Within the block, hub ids are fetched at `access`'s revision, into its cache, with its token."""
    return _setting(_HUB_ACCESS, access)


def resolve_model_dir(ref: str | Path) -> Path:
    """A local folder for `ref`: the folder itself, or a hub id downloaded to the HF cache."""
    trust_remote_code, access = remote_code_trusted(), _HUB_ACCESS.get() or HubAccess()
    path = Path(ref).expanduser()
    if path.is_dir():
        if access.revision is not None:
            raise PatcherError(f"{ref} is a local folder: a revision applies to hub ids only, drop it")
        _refuse_remote_code(path, trust_remote_code)
        return path.resolve()
    looks_like_hub_id = str(ref).count("/") == 1 and not str(ref).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise PatcherError(f"model folder {ref} does not exist: pass a model folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(
                str(ref),
                allow_patterns=hub_patterns(trust_remote_code),
                revision=access.revision,
                cache_dir=access.cache_dir,
                token=access.token,
            )
        )
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PatcherError(f"could not fetch {ref} from the hub ({reason}): pass a local folder instead") from None
    _refuse_remote_code(folder, trust_remote_code)
    return folder


def hub_patterns(trust_remote_code: bool) -> list[str]:
    """The files a hub download fetches: configs, safetensors weights, tokenizer files, chat
    templates, and the model's code only when it is to be run; never pickled weights."""
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "README.md", "LICENSE*"]
    return [*patterns, "*.py"] if trust_remote_code else patterns


def _refuse_remote_code(folder: Path, trust_remote_code: bool) -> None:
    config = _read_config(folder)
    if config.get("auto_map") and not trust_remote_code:
        raise PatcherError(f"{folder} needs custom code (auto_map in config.json): pass --trust-remote-code to run it")


def _read_config(folder: Path) -> dict:
    config = folder / "config.json"
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError:
        raise PatcherError(f"{config} is not valid JSON") from None


def detect_family(folder: Path) -> str:
    """causal-lm, t2i-unet or classifier, from the folder's config files."""
    if (folder / "model_index.json").is_file():
        return "t2i-unet"
    architectures = _read_config(folder).get("architectures") or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForImageClassification") for a in architectures):
        return "classifier"
    raise PatcherError(f"cannot tell the model family of {folder}: set [model] family in the spec")


def load_causal_lm(folder: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a folder, in eval mode; edits are computed in fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise PatcherError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    Checkpoint(folder)  # refuses a folder without safetensors weights before transformers reads a pickle
    trusted = remote_code_trusted()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trusted)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trusted)
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise PatcherError(f"cannot load a causal LM from {folder}: {reason}") from None
    refuse_non_finite(model.named_parameters(), folder)
    return model.eval(), tokenizer


def load_classifier(folder: Path):
    """An image classifier from a folder, in fp32 eval mode."""
    from transformers import AutoModelForImageClassification

    if not (folder / "config.json").is_file():
        raise PatcherError(f"{folder} has no config.json: it is not a Hugging Face model folder")
    Checkpoint(folder)  # refuses a folder without safetensors weights before transformers reads a pickle
    try:
        model = AutoModelForImageClassification.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=remote_code_trusted()
        )
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise PatcherError(f"cannot load an image classifier from {folder}: {reason}") from None
    refuse_non_finite(model.named_parameters(), folder)
    return model.eval()


def load_pipeline(folder: Path, unet=None):
    """A diffusers pipeline from a folder, in fp32 on CPU, without progress bars.

    `unet` replaces the folder's UNet (a quantized one, say), as `from_pretrained` allows.
    """
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise PatcherError(f"{folder} has no model_index.json: it is not a diffusers pipeline folder")
    Checkpoint(folder)  # every component's weights in safetensors, before diffusers reads a pickle
    components = {} if unet is None else {"unet": unet}
    try:
        pipe = DiffusionPipeline.from_pretrained(
            folder, dtype=torch.float32, trust_remote_code=remote_code_trusted(), **components
        )
    except (OSError, ValueError) as err:
        reason = str(err).splitlines()[0]
        raise PatcherError(f"cannot load a diffusers pipeline from {folder}: {reason}") from None
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            refuse_non_finite(((f"{name}/{p}", t) for p, t in component.named_parameters()), folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_fingerprint(folder: Path) -> str:
    """sha256 over every weight tensor's name and bytes: a cache key for statistics."""
    checkpoint = Checkpoint(folder)
    digest = hashlib.sha256()
    for name, sha in sorted(checkpoint.fingerprints(checkpoint.names()).items()):
        digest.update(f"{name}={sha};".encode())
    return digest.hexdigest()


@contextmanager
def trainable_only(model: torch.nn.Module, params: Iterable[torch.nn.Parameter] = ()) -> Iterator[torch.nn.Module]:
    """Only `params` require grad while the body runs, so backward computes no other weight's
    gradient (a search over an added shift needs none: on SmolLM2 they cost 42% of its time).
    Every flag is restored after, and the gradients of `params` are dropped."""
    previous = {p: p.requires_grad for p in model.parameters()}
    trainable = list(params)
    try:
        for p in previous:
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        yield model
    finally:
        for p, flag in previous.items():
            p.requires_grad_(flag)
        for p in trainable:
            p.grad = None
