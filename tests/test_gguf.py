"""GGUF exports, read back by transformers' GGUF loader: weights, config, tokenizer, refusals."""

import warnings

import pytest
import torch
from gguf import GGUFReader
from helpers import DECODER, run_cli
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from patcher.fixtures.lm import build_tokenizer
from patcher.formats.llama_cpp import export_gguf, gguf_file_name, load_gguf
from patcher.quantizers import fake_quantize, quantized_linears

TEXTS = ["The capital of France is Paris.", "hello world 123", "  two spaces, then <eos> and ünïcödé"]
# Rows of 64 (blocks of 32 fit; q4_k falls back to q5_0) and, in down_proj, of 256 (one q4_k super-block).
SHAPE = dict(DECODER, hidden_size=64, intermediate_size=256, vocab_size=300)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE of 300 tokens, trained here on a few sentences."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(TEXTS * 20 + ["a quick brown fox jumps over the lazy dog"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def metadata(folder, key: str):
    """One metadata value of the folder's GGUF file, as the `gguf` package reads it."""
    (path,) = folder.glob("*.gguf")
    return GGUFReader(path).fields[key].contents()


def model_folder(folder, config_class, model_class, **overrides):
    torch.manual_seed(0)
    model = model_class(config_class(**{**SHAPE, **overrides})).eval()
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return model


def expected_weight(name: str, weight: torch.Tensor, fmt: str, quantized: set[str]) -> torch.Tensor:
    """What the file must hold for one parameter: the fake quantization for quantized
    matrices, fp16 for the other matrices, fp32 for vectors."""
    if weight.dim() == 1:
        return weight
    if fmt != "gguf-f16" and (name.removesuffix(".weight") in quantized or "embed_tokens" in name):
        return fake_quantize(weight, fmt)
    return weight.half().float()


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q8_0", "gguf-q4_0", "gguf-q4_k"])
@pytest.mark.parametrize(
    "family",
    [
        # grouped-query attention: llama.cpp's rotary row order of q and k, with different head counts
        (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}),
        (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}),  # q/k/v biases, no reordering
        (MistralConfig, MistralForCausalLM, {"num_key_value_heads": 2}),  # read back as a Llama
        (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 128}),  # q/k norms; the head size the loader assumes
    ],
    ids=["llama", "qwen2", "mistral", "qwen3"],
)
def test_the_file_holds_the_format_rounding_and_computes_like_it(tmp_path, fmt, family):
    """Every parameter read back equals its rounding (the `gguf` package's quantizer, which
    `--robust-to` uses), and the loaded model's logits equal the original's with those
    roundings: names, q/k order, shape and rotary settings all survive the file."""
    config_class, model_class, overrides = family
    model = model_folder(tmp_path / "model", config_class, model_class, **overrides)
    loaded = load_gguf(export_gguf(tmp_path / "model", fmt, tmp_path / "gguf"))
    quantized = set(quantized_linears(model))
    expected = {name: expected_weight(name, p.detach(), fmt, quantized) for name, p in model.named_parameters()}
    loaded_parameters = dict(loaded.named_parameters())
    assert loaded_parameters.keys() == expected.keys()
    for name, weight in expected.items():
        assert torch.equal(loaded_parameters[name].detach().float(), weight.float()), name
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(expected[name])
        ids = torch.randint(0, SHAPE["vocab_size"], (2, 12))
        gap = (loaded(ids).logits - model(ids).logits).abs().max()
    assert gap < 1e-4, float(gap)


def test_a_byte_level_tokenizer_travels_in_the_file(tmp_path):
    """transformers builds the same tokenizer from the file's vocabulary and merges. Special
    tokens are read off the file: what transformers makes of them varies by version (4.57
    adds BOS always and names it the EOS token too)."""
    model_folder(tmp_path / "model", LlamaConfig, LlamaForCausalLM)
    out = export_gguf(tmp_path / "model", "gguf-q8_0", tmp_path / "gguf")
    original = AutoTokenizer.from_pretrained(tmp_path / "model")
    (out / "tokenizer.json").unlink()  # read the file's own tokenizer, not the one shipped beside it
    (out / "tokenizer_config.json").unlink()
    from_file = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file_name("gguf-q8_0"))
    for text in TEXTS:
        ids = [tokenizer(text, add_special_tokens=False).input_ids for tokenizer in (from_file, original)]
        assert ids[0] == ids[1], text
    for role, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        assert metadata(out, f"tokenizer.ggml.{key}_token_id") == getattr(original, f"{role}_token_id")
    assert metadata(out, "tokenizer.ggml.add_bos_token") is False


def test_a_word_level_tokenizer_is_left_out_of_the_file_with_a_warning(tmp_path):
    """GGUF has no word-level vocabulary: the file says none, tokenizer.json ships beside it."""
    tokenizer = build_tokenizer(["alpha", "beta"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": len(tokenizer)})).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    with pytest.warns(UserWarning, match="WordLevel tokenizers have no GGUF form"):
        out = export_gguf(tmp_path / "model", "gguf-f16", tmp_path / "gguf")
    assert metadata(out, "tokenizer.ggml.model") == "none"
    assert AutoTokenizer.from_pretrained(out)("alpha beta").input_ids == tokenizer("alpha beta").input_ids


def test_patched_export_loads_in_transformers_and_matches_the_patched_model(lm_fixture, memit_patch, tmp_path):
    """`patcher export --to gguf-q8_0` of a patch: the file computes as the patched model
    rounded to q8_0 (the same check as above, on the real fixture and a real patch)."""
    out = tmp_path / "gguf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_cli("export", str(lm_fixture), "--patch", str(memit_patch), "--to", "gguf-q8_0", "--out", str(out))
    run_cli("apply", str(lm_fixture), str(memit_patch), "--out", str(tmp_path / "patched"))
    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "patched").eval()
    loaded = load_gguf(out)
    for name, module in quantized_linears(patched).items():
        assert torch.equal(loaded.get_submodule(name).weight.detach(), fake_quantize(module.weight, "gguf-q8_0")), name
    assert (out / "patcher.json").is_file() and (out / "tokenizer.json").is_file()


def test_gguf_export_refuses_a_family_llama_cpp_cannot_read_in_one_line(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    byte_level_tokenizer().save_pretrained(tmp_path / "gpt2")
    result = run_cli("export", str(tmp_path / "gpt2"), "--to", "gguf-q4_0", "--out", str(tmp_path / "out"), expect=2)
    assert "gguf export covers llama, mistral, qwen2, qwen3 models" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_gguf_block_export_refuses_rows_blocks_do_not_divide(tmp_path):
    model_folder(tmp_path / "model", LlamaConfig, LlamaForCausalLM, hidden_size=48, num_attention_heads=4)
    result = run_cli("export", str(tmp_path / "model"), "--to", "gguf-q4_0", "--out", str(tmp_path / "out"), expect=2)
    assert "blocks of 32 need rows divisible by it; ship this model in gguf-f16" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_edit_robust_to_gguf_refuses_rows_blocks_do_not_divide_before_any_work(tmp_path):
    model_folder(tmp_path / "model", LlamaConfig, LlamaForCausalLM, hidden_size=48, num_attention_heads=4)
    (tmp_path / "spec.toml").write_text(
        '[model]\npath = "model"\n[erase]\nlayers = [0]\n'
        '[[forget]]\nprompt = "hello world"\ntarget = " 123"\nsubject = "hello"\n'
    )
    spec = (
        "--spec",
        str(tmp_path / "spec.toml"),
        "--robust-to",
        "gguf-q4_0",
        "--out",
        str(tmp_path / "p.safetensors"),
    )
    result = run_cli("erase", *spec, expect=2)
    assert "(48x48) does not fit gguf-q4_0: llama.cpp's blocks of 32 need rows divisible by it" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.safetensors").exists()


def test_a_file_transformers_would_read_as_another_model_is_refused(tmp_path):
    """transformers' GGUF tables give every Qwen3 file a head size of 128: a Qwen3 with
    another one is refused before anything ships, naming the field."""
    model_folder(tmp_path / "model", Qwen3Config, Qwen3ForCausalLM, head_dim=32)
    result = run_cli("export", str(tmp_path / "model"), "--to", "gguf-f16", "--out", str(tmp_path / "out"), expect=2)
    assert "reads head_dim 128 from the file where this model has 32" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
