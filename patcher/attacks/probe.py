"""Residual knowledge: a linear probe reads the erased answer out of the patched model's hidden states.

An edit can stop the answer from reaching the output while the hidden states still carry
it ("Intrinsic Evaluation of Unlearning Using Parametric Knowledge Traces", ConceptVectors).
Per layer, a linear probe is trained on the base model's hidden state at the last prompt
token of the retain facts, to predict each answer's first token; it then reads the forget
prompts' hidden states of the base (what a probe can read at all) and of the patched model.
The gated figure is the patched model's best layer among those where the probe reads at
least `min_base_accuracy` of the answers from the base: elsewhere a probe's hits are chance
(on the LM fixture, 1 of 24 answers the base never knew is "read" at some early layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from patcher.attacks import AttackInputs, register
from patcher.errors import PatcherError
from patcher.settings import setting
from patcher.tokens import encode_prompt, encode_target, pad_id, right_padded


@dataclass(frozen=True)
class ProbeBudget:
    """The probe attack's [attacks.probe] keys."""

    steps: int = setting(300, "full-batch Adam steps per layer's probe", minimum=0)
    lr: float = setting(0.05, "Adam's learning rate", minimum=0)
    weight_decay: float = setting(1e-3, "L2 penalty on the probe's weights", minimum=0)
    min_base_accuracy: float = setting(
        0.5, "a layer is gated if its probe reads this share of the base's answers", minimum=0
    )


@torch.no_grad()
def last_token_states(model, prompts: list[list[int]], pad: int) -> torch.Tensor:
    """Every layer's hidden state at each prompt's last token: (layers + 1, prompts, width);
    row 0 is the embeddings, row L the output of decoder layer L - 1."""
    ids, mask = right_padded(prompts, pad)
    out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), output_hidden_states=True)
    last = torch.tensor([len(p) - 1 for p in prompts])
    return torch.stack([h[torch.arange(len(prompts)), last.to(h.device)].float().cpu() for h in out.hidden_states])


def train_probe(states: torch.Tensor, labels: torch.Tensor, classes: int, budget: ProbeBudget) -> torch.nn.Linear:
    """A linear classifier from `states` (n, width) to `labels`, trained to convergence on them."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(states.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    for _ in range(budget.steps):
        loss = F.cross_entropy(probe(states), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return probe.eval()


@register(
    "probe",
    ProbeBudget,
    ("causal-lm",),
    "a linear probe per layer, trained on the base's hidden states of the retain facts, reading the forget answers",
)
def probe(inputs: AttackInputs, budget: ProbeBudget) -> dict:
    spec, tokenizer = inputs.spec, inputs.tokenizer
    if not spec.retain:
        raise PatcherError("the probe attack needs [[retain]] facts: its probes are trained on them")
    pad = pad_id(tokenizer)
    answers = sorted({encode_target(tokenizer, f.target)[0] for f in [*spec.retain, *spec.forget]})
    index = {token: i for i, token in enumerate(answers)}

    def encoded(facts) -> tuple[list[list[int]], torch.Tensor]:
        labels = [index[encode_target(tokenizer, f.target)[0]] for f in facts]
        return [encode_prompt(tokenizer, f.prompt) for f in facts], torch.tensor(labels)

    (retain, retain_labels), (forget, forget_labels) = encoded(spec.retain), encoded(spec.forget)
    train = last_token_states(inputs.base, retain, pad)
    base_forget, patched_forget = (
        last_token_states(inputs.base, forget, pad),
        last_token_states(inputs.patched, forget, pad),
    )
    per_layer = []
    for layer in range(len(train)):
        mean, std = train[layer].mean(0), train[layer].std(0).clamp(min=1e-6)
        classifier = train_probe((train[layer] - mean) / std, retain_labels, len(answers), budget)
        with torch.no_grad():
            read = [(classifier((s[layer] - mean) / std).argmax(-1) == forget_labels).float().mean().item()
                    for s in (base_forget, patched_forget)]  # fmt: skip
        per_layer.append({"layer": layer, "base": read[0], "patched": read[1]})
    readable = [row for row in per_layer if row["base"] >= budget.min_base_accuracy]
    best = max(readable, key=lambda row: row["patched"], default={"patched": 0.0, "layer": None})
    return {
        "forget_accuracy": best["patched"],
        "layer": best["layer"],
        "readable_layers": [row["layer"] for row in readable],
        "per_layer": per_layer,
    }
