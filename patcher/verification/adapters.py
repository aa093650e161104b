"""Re-verify an exported PEFT adapter: the base model with the adapter loaded by peft itself."""

from __future__ import annotations

import json
from pathlib import Path

from patcher.formats.patch import Patch
from patcher.formats.peft import SUMMARY_FILE
from patcher.models import remote_code_trusted
from patcher.spec import Spec, parse_spec
from patcher.verification.lm import lm_metrics, tokenizer_of


def peft_adapter_metrics(base: Path, adapter: Path, spec: Spec) -> dict[str, float]:
    """Forget, paraphrase and retain accuracy of `PeftModel.from_pretrained(base, adapter)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype="auto", trust_remote_code=remote_code_trusted()), adapter
    ).eval()
    return lm_metrics(model, tokenizer_of(base), spec)


def peft_export_summary(base: Path, adapter: Path, patch: Patch) -> str:
    """The adapter's ranks and kept energy, and (when the patch's spec has facts) its accuracies through peft."""
    layers = json.loads((adapter / SUMMARY_FILE).read_text()).values()
    kept = min(layer["energy_kept"] for layer in layers)
    ranks = sorted({layer["rank"] for layer in layers})
    lines = [f"peft adapter: ranks {ranks}, at least {kept:.4%} of each delta's energy kept"]
    if patch.spec.get("forget"):
        metrics = peft_adapter_metrics(base, adapter, parse_spec(patch.spec, base))
        lines.append("through peft: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return "\n".join(lines)
