"""Relearning: a few fine-tuning steps on text without the forget facts, then the forget set.

Published unlearning is often shallow: fine-tuning on unrelated or merely related text
brings the "forgotten" answers back. The attack trains a copy of the patched model on the
spec's retain facts and the corpus lines that mention no forget subject, for a fixed
budget, and scores the forget facts and their paraphrases after it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch

from patcher.attacks import AttackInputs, register
from patcher.errors import PatcherError
from patcher.scoring import accuracy
from patcher.settings import setting
from patcher.spec import Spec, infer_subject
from patcher.stats import read_corpus
from patcher.tokens import pad_id, right_padded


@dataclass(frozen=True)
class RelearnBudget:
    """The relearning attack's [attacks.relearn] keys."""

    steps: int = setting(50, "AdamW steps of full fine-tuning", minimum=0)
    lr: float = setting(1e-4, "AdamW's learning rate", minimum=0)
    batch_size: int = setting(16, "sentences per step, drawn with replacement", minimum=1)
    seed: int = setting(0, "seed of the sentence draws")


def relearning_text(spec: Spec) -> list[str]:
    """The retain facts as sentences, and the corpus lines that name no forget subject (a
    line about someone else may share a forget fact's answer: "born in C27" is not a fact
    until it says whose)."""
    sentences = [f"{fact.prompt} {fact.target}" for fact in spec.retain]
    if spec.corpus is not None:
        subjects = sorted({infer_subject(fact) for fact in spec.forget}, key=len, reverse=True)
        named = re.compile(r"\b(?:" + "|".join(re.escape(s) for s in subjects) + r")\b")
        sentences += [line for line in read_corpus(spec.corpus) if not named.search(line)]
    return sentences


def fine_tuned(model, tokenizer, sentences: list[str], budget: RelearnBudget):
    """A copy of `model` after `budget.steps` AdamW steps of next-token loss on `sentences`."""
    attacker = copy.deepcopy(model).float()
    encoded = [tokenizer(s).input_ids for s in sentences]
    pad = pad_id(tokenizer)
    optimizer = torch.optim.AdamW(attacker.parameters(), lr=budget.lr)
    generator = torch.Generator().manual_seed(budget.seed)
    attacker.train()
    for _ in range(budget.steps):
        picks = torch.randint(len(encoded), (budget.batch_size,), generator=generator).tolist()
        ids, mask = right_padded([encoded[i] for i in picks], pad)
        device = next(attacker.parameters()).device
        labels = ids.masked_fill(mask == 0, -100)
        loss = attacker(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return attacker.eval()


@register(
    "relearn",
    RelearnBudget,
    ("causal-lm",),
    "fine-tuning on the retain facts and the corpus lines naming no forget subject, then the forget set",
)
def relearn(inputs: AttackInputs, budget: RelearnBudget) -> dict:
    spec, tokenizer = inputs.spec, inputs.tokenizer
    sentences = relearning_text(spec)
    if not sentences:
        raise PatcherError("the relearn attack needs [[retain]] facts or a [stats] corpus to train on")
    attacker = fine_tuned(inputs.patched, tokenizer, sentences, budget)
    forget = [(f.prompt, f.target) for f in spec.forget]
    paraphrases = [(p, f.target) for f in spec.forget for p in f.paraphrases]
    return {
        "forget_accuracy": accuracy(attacker, tokenizer, forget),
        "paraphrase_accuracy": accuracy(attacker, tokenizer, paraphrases),
        "retain_accuracy": accuracy(attacker, tokenizer, [(r.prompt, r.target) for r in spec.retain]),
        "sentences": len(sentences),
    }
