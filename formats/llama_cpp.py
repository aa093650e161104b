"""GGUF exports of causal LMs: the file llama.cpp, Ollama and LM Studio run.

`gguf-f16` stores every matrix in fp16; `gguf-q8_0`, `gguf-q4_0` and `gguf-q4_k` store the
token embeddings and every decoder matrix in llama.cpp's block types (numerics in
`patcher.quantizers` and `patcher.kquants`), the output head in fp16 (as transformers keeps
`lm_head` out of its quantized loads) and norms and biases in fp32. Tensor names and
metadata keys are the `gguf` package's own tables. The tokenizer goes into the file when GGUF describes it
(byte-level BPE: vocabulary, merges, special tokens, chat template); `tokenizer.json` ships
beside the file either way, so transformers users get the model's own tokenizer.

Verify and tests read the file back with transformers' GGUF loader
(`from_pretrained(folder, gguf_file=...)`), which dequantizes with the same package.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from patcher.errors import PatcherError
from patcher.formats.atomic import atomic_path
from patcher.formats.checkpoint import Checkpoint, tensor_entries
from patcher.formats.quantized import TOKENIZER_FILES
from patcher.formats.registry import Target, register, whole_model
from patcher.quantizers import GGUF_BLOCK, GGUF_TYPES, gguf_quantize, gguf_type

GGUF_FORMATS = ("gguf-f16", *GGUF_TYPES)
# `--robust-to` solves inside a box that keeps every block's scale: an absmax scale stays put
# while no weight passes it, but Q4_K's scales and minimums are a least-squares fit to every
# weight of their sub-block, which any change moves.
ROBUST_GGUF = ("gguf-q8_0", "gguf-q4_0")
# model_type -> (llama.cpp architecture, whether llama.cpp wants q/k rows in its rotary order)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
OUTPUT_HEAD = "output.weight"
# llama.cpp's token types
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_file_name(fmt: str) -> str:
    """The file an export of `fmt` writes: `model-q4_0.gguf`, as llama.cpp's tools name them."""
    return f"model-{fmt.removeprefix('gguf-')}.gguf"


def check_gguf_model(config) -> tuple[str, bool]:
    """(llama.cpp architecture, q/k reordered) for a model GGUF can carry; else a one-line refusal."""
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise PatcherError(
            f"gguf export covers {', '.join(ARCHITECTURES)} models, which llama.cpp and transformers' GGUF "
            f"loader both read; this model is {model_type!r}: ship it as safetensors, onnx or a quantized format"
        )
    scaling = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise PatcherError(
            f"gguf export writes plain rotary embeddings; this model's rope_type is {scaling!r}: "
            "ship it as safetensors, onnx or a quantized format"
        )
    return ARCHITECTURES[model_type]


def rotary_order(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k projection's rows in llama.cpp's rotary order: within each head, the two halves
    that transformers rotates together become interleaved pairs (transformers' GGUF loader
    undoes this)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def export_gguf(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the full-precision model folder `source` as one GGUF file of `fmt` in `out`, with
    its tokenizer; atomic."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    source = Path(source)
    config = AutoConfig.from_pretrained(source)
    architecture, reorder = check_gguf_model(config)
    checkpoint = Checkpoint(source)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()], config.num_hidden_layers)
    planned = _plan(checkpoint, names, config, fmt)
    tokenizer = AutoTokenizer.from_pretrained(source)
    with atomic_path(out, is_dir=True) as tmp:
        writer = gguf.GGUFWriter(tmp / gguf_file_name(fmt), architecture, use_temp_file=True)
        _write_config(writer, config, architecture, fmt)
        if not _write_tokenizer(writer, tokenizer, config.vocab_size):
            warnings.warn(
                f"{type(tokenizer.backend_tokenizer.model).__name__} tokenizers have no GGUF form: the file "
                "carries none (llama.cpp needs one); tokenizer.json ships beside it for transformers",
                stacklevel=2,
            )
        heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
        for name, (target, kind) in planned.items():
            tensor = checkpoint.tensor(name).float()
            role = target.split(".")[-2]
            if reorder and role in heads and tensor.dim() == 2:
                tensor = rotary_order(tensor, heads[role])
            if kind in GGUF_TYPES:
                stored = gguf.GGMLQuantizationType[gguf_type(kind, tensor.shape[1])]
                writer.add_tensor(target, gguf_quantize(tensor, kind), raw_dtype=stored)
            else:
                writer.add_tensor(target, tensor.numpy().astype(np.float16 if kind == "F16" else np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        check_read_back(tmp / gguf_file_name(fmt), config)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
    return Path(out)


SHAPE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size",
)  # fmt: skip


def check_read_back(path: Path, config) -> None:
    """Refuse a file that transformers' GGUF loader would read as another shape of model (its
    tables fill what they do not map from the config class's defaults: Qwen3's head size is
    always 128 there), so that nothing verify cannot read back is shipped."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    read = dict(load_gguf_checkpoint(str(path))["config"])
    loaded = AutoConfig.for_model(read.pop("model_type"), **read)
    for field in SHAPE_FIELDS:
        wanted, got = shape_of(config, field), shape_of(loaded, field)
        if wanted != got:
            raise PatcherError(
                f"transformers' GGUF loader reads {field} {got} from the file where this model has {wanted}, so "
                "it would load another model: ship this model as safetensors, onnx or a quantized format"
            )


def shape_of(config, field: str) -> int:
    """A config's size `field`; the head size derived from the width when the config has none."""
    if field == "head_dim":
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(config, field)


def _plan(checkpoint: Checkpoint, names, config, fmt: str) -> dict[str, tuple[str, str]]:
    """checkpoint tensor -> (GGUF name, storage: a format of GGUF_TYPES, "F16" or "F32"),
    checked whole before anything is written."""
    shapes = {name: entry["shape"] for shard in checkpoint.shards for name, entry in tensor_entries(shard)[0].items()}
    planned = {}
    for name in checkpoint.names():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reads a missing output head as tied to the embeddings
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise PatcherError(f"{name} has no GGUF name in llama.cpp's {config.model_type} layout: not exportable")
        shape = shapes[name]
        if len(shape) != 2:
            planned[name] = (target, "F32")
        elif fmt == "gguf-f16" or target == OUTPUT_HEAD:
            planned[name] = (target, "F16")
        elif shape[1] % GGUF_BLOCK:
            raise PatcherError(
                f"{name} {tuple(shape)} does not fit {fmt}: llama.cpp's blocks of {GGUF_BLOCK} need rows "
                "divisible by it; ship this model in gguf-f16"
            )
        else:
            planned[name] = (target, fmt)
    return planned


def _write_config(writer, config, architecture: str, fmt: str) -> None:
    """The model's shape under llama.cpp's metadata keys."""
    from gguf import LlamaFileType

    head_dim = shape_of(config, "head_dim")
    rope = getattr(config, "rope_parameters", None) or {}
    # The name stays the architecture's: transformers' loader would read a llama file named
    # "mistral" as a MistralForCausalLM, which its GGUF tables (gguf 0.19) cannot map.
    writer.add_name(architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {
        "gguf-f16": LlamaFileType.MOSTLY_F16,
        "gguf-q8_0": LlamaFileType.MOSTLY_Q8_0,
        "gguf-q4_0": LlamaFileType.MOSTLY_Q4_0,
        "gguf-q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    }
    writer.add_file_type(file_types[fmt])


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> bool:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" vocabulary; False (a "none" vocabulary)
    for any other kind."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    byte_level = backend["model"]["type"] == "BPE" and "ByteLevel" in json.dumps(backend.get("pre_tokenizer"))
    if not byte_level:
        writer.add_tokenizer_model("none")
        return False
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {token.content: token for token in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        else:
            tokens.append(token)
            types.append(NORMAL if token not in added else CONTROL if added[token].special else USER_DEFINED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{role}_token_id")
        if index is not None:
            getattr(writer, f"add_{role}_token_id")(index)
    probe = tokenizer("a").input_ids
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return True


def load_gguf(folder: str | Path):
    """An exported GGUF folder, read by transformers' GGUF loader (dequantized to fp32)."""
    from transformers import AutoModelForCausalLM

    files = sorted(Path(folder).glob("*.gguf"))
    if len(files) != 1:
        raise PatcherError(f"{folder} holds {len(files)} .gguf files: a GGUF export holds exactly one")
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=files[0].name).eval()


def load_as_gguf(folder: str | Path, fmt: str):
    """A full-precision folder as it computes once written to `fmt` and read back (verify
    tokenizes with the folder's own tokenizer, so whether the file carries one is moot)."""
    with tempfile.TemporaryDirectory(prefix="patcher-gguf-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".* tokenizers have no GGUF form")
        return load_gguf(export_gguf(folder, fmt, Path(tmp) / "gguf"))


def _target(fmt: str) -> Target:
    file = gguf_file_name(fmt)
    return Target(
        fmt,
        "causal-lm",
        whole_model(lambda source, out: export_gguf(source, fmt, out)),
        load=lambda folder: load_as_gguf(folder, fmt),
        load_artifact=load_gguf,
        snippet=f'AutoModelForCausalLM.from_pretrained("{{path}}", gguf_file="{file}")  # llama.cpp: {{path}}/{file}',
        robust=fmt in ROBUST_GGUF,
    )


register(*map(_target, GGUF_FORMATS))
