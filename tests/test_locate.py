"""`patcher locate`: subject attention mass through attention_stats, against eager attention weights."""

import json

import torch
from helpers import run_cli, run_cli_process
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from patcher.adapters import causal_lm_adapter
from patcher.locate import locate, subject_positions, subject_prompts
from patcher.models import load_causal_lm
from patcher.spec import infer_subject, load_spec


def eager_subject_share(model, tokenizer, facts) -> torch.Tensor:
    """Independent: transformers' eager attention probabilities, sliced at the subject tokens."""
    model.set_attn_implementation("eager")
    total, prompts = 0, 0
    for ids, positions in subject_prompts(tokenizer, facts):
        with torch.no_grad():
            attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
        probs = torch.stack(attentions)[:, 0]  # (layers, heads, query, key)
        seeing = len(ids) - positions[0]
        total = total + probs[..., positions].sum((-1, -2)).double() / seeing
        prompts += 1
    return total / prompts


def test_locate_matches_eager_attention(lm_fixture):
    model, tokenizer = load_causal_lm(lm_fixture)
    facts = load_spec(lm_fixture / "spec.toml").forget[:4]
    found = locate(causal_lm_adapter(model), tokenizer, facts)
    expected = eager_subject_share(model, tokenizer, facts)
    assert found.prompts == 12
    torch.testing.assert_close(found.mass.double(), expected, rtol=1e-4, atol=1e-5)
    window = found.edit_layers()
    assert len(window) == 2 and window == list(range(window[0], window[0] + 2))
    assert window[-1] < found.reading_layer or window[0] == 0  # before the reading layer, or from layer 0


def test_subject_positions_cover_the_subject_tokens(lm_fixture):
    _, tokenizer = load_causal_lm(lm_fixture)
    fact = load_spec(lm_fixture / "spec.toml").forget[0]
    subject = infer_subject(fact)
    ids, positions = subject_positions(tokenizer, fact.prompt, subject)
    assert tokenizer.decode([ids[p] for p in positions]).strip() == subject


def test_a_subject_that_opens_the_prompt_starts_at_the_first_token_without_bos():
    """SmolLM2's tokenizer adds no BOS: "Hamlet was written by" has Hamlet at token 0."""
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "Hamlet": 1, "was": 2, "written": 3, "by": 4}, "<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert subject_positions(tokenizer, "Hamlet was written by", "Hamlet") == ([1, 2, 3, 4], [0])


def test_locate_and_fisher_stats_cli(lm_fixture, tmp_path):
    spec = str(lm_fixture / "spec.toml")
    found = json.loads(run_cli("locate", str(lm_fixture), "--spec", spec, "--json").stdout)
    assert found["edit_layers"] and len(found["per_head"]) == 4
    out = tmp_path / "fisher.safetensors"
    run_cli("stats", str(lm_fixture), "--corpus", str(lm_fixture / "corpus.txt"), "--spec", spec,
            "--kind", "fisher", "--out", str(out))  # fmt: skip
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["kind"] == "fisher"
        names = list(f.keys())
        assert names == [f"model.layers.{layer}.mlp.down_proj.fisher" for layer in found["edit_layers"]]
        assert torch.isfinite(f.get_tensor(names[0])).all() and f.get_tensor(names[0]).sum() > 0


def test_bench_kernels_runs_on_this_machine():
    result = run_cli_process("bench", "kernels", "--quick")  # the suite prints from a process of its own
    for op in ("second_moment", "fisher_diag", "attention_stats"):
        assert f"{op} interpreter check" in result.stdout or f"{op} on" in result.stdout
    assert "torch-fp32-addmm" in result.stdout and "einsum-fp32" in result.stdout and "sdpa" in result.stdout


def test_bench_rejects_quick_outside_kernels():
    result = run_cli("bench", "e2e", "--quick", expect=2)
    assert "kernels suite only" in result.stderr
