"""MEMIT and AlphaEdit erase every fact of the tiny models whose layouts the residual-stream
search alone did not erase: OLMo 2 normalises the MLP's output before the residual stream
adds it (the target values are searched at the projection, through the norm), and Cohere
scales its logits to a flat distribution (the search goes on until the target trails by
erase's margin, not only until it leaves the top)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from patcher.erasure import erase
from patcher.fixtures.architectures import write_tiny_lm
from patcher.spec import load_spec


def _greedy_words(model, tokenizer, prompts: list[str]) -> list[str]:
    with torch.no_grad():
        return [
            tokenizer.decode(int(model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1].argmax())).strip()
            for prompt in prompts
        ]


@pytest.fixture(scope="module", params=["olmo2", "cohere"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    write_tiny_lm(request.param, folder)
    return folder


@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_the_edit_erases_every_fact(tiny, method):
    spec = load_spec(tiny / "spec.toml")
    patch = erase(spec, tiny, method=method)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny)
    prompts, targets = [f.prompt for f in spec.forget], [f.target for f in spec.forget]
    assert _greedy_words(model, tokenizer, prompts) == targets
    params = dict(model.named_parameters())
    assert patch.params == ["model.layers.1.mlp.down_proj.weight"]
    with torch.no_grad():
        for name in patch.params:
            params[name].add_(patch.delta(name))
    erased = _greedy_words(model, tokenizer, prompts)
    assert all(word != target for word, target in zip(erased, targets, strict=True)), erased


def test_through_the_norm_each_edited_layer_searches_its_own_value(tmp_path):
    write_tiny_lm("olmo2", tmp_path)
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(spec_path.read_text().replace("layers = [1]", "layers = [0, 1]"))
    spec = load_spec(spec_path)
    patch = erase(spec, tmp_path, method="memit")
    assert patch.params == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in (0, 1)]
    assert all(patch.delta(name).norm() > 0 for name in patch.params)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in patch.params:
            params[name].add_(patch.delta(name))
    erased = _greedy_words(model, tokenizer, [f.prompt for f in spec.forget])
    assert all(word != f.target for word, f in zip(erased, spec.forget, strict=True)), erased
