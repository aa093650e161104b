"""A model that ships its own code (auto_map) runs only under --trust-remote-code, on every command."""

import json
from pathlib import Path

import pytest
from helpers import run_cli
from transformers import AutoModelForCausalLM

from patcher.fixtures.architectures import write_tiny_lm

# A Llama under a model_type transformers does not know: only the folder's code can load it.
CUSTOM_CODE = """
from transformers import LlamaConfig, LlamaForCausalLM


class CustomLlamaConfig(LlamaConfig):
    model_type = "custom_llama"


class CustomLlamaForCausalLM(LlamaForCausalLM):
    config_class = CustomLlamaConfig
"""


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("remote") / "model"
    write_tiny_lm("llama", folder)
    (folder / "custom_llama.py").write_text(CUSTOM_CODE)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="custom_llama",
        architectures=["CustomLlamaForCausalLM"],
        auto_map={
            "AutoConfig": "custom_llama.CustomLlamaConfig",
            "AutoModelForCausalLM": "custom_llama.CustomLlamaForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_every_command_refuses_custom_code_without_the_flag_and_runs_it_with_it(custom_model, tmp_path):
    spec, patch, patched = str(custom_model / "spec.toml"), str(tmp_path / "p.st"), tmp_path / "patched"
    refusal = "needs custom code (auto_map in config.json): pass --trust-remote-code"
    commands = {
        "erase": ["erase", str(custom_model), "--spec", spec, "--out", patch],
        "apply": ["apply", str(custom_model), patch, "--out", str(patched)],
        "export": ["export", str(patched), "--to", "int8", "--out", str(tmp_path / "int8")],
        "verify": ["verify", "--base", str(custom_model), "--patched", str(patched), "--spec", spec,
                   "--formats", "safetensors,int8", "--report", str(tmp_path / "report.json")],
    }  # fmt: skip
    for name, args in commands.items():
        refused = run_cli(*args, expect=2)
        assert refusal in refused.stderr, name
        run_cli(*args, "--trust-remote-code", expect=None if name == "verify" else 0)

    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["formats"]) == {"safetensors", "int8"}
    assert report["formats"]["safetensors"]["forget_accuracy"] < 1.0  # the patch took effect
    # The int8 export carries the model's code, so its consumer loads it as the base loads.
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "int8", trust_remote_code=True, device_map="cpu")
    assert type(exported).__name__ == "CustomLlamaForCausalLM"
    assert type(exported.model.layers[1].mlp.down_proj).__name__ == "Linear8bitLt"
