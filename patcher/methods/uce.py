"""UCE and RECE: closed-form concept erasure in the cross-attention K/V projections.

UCE (Gandikota et al., 2024) maps each erased concept's embedding c_e to what the original
projection made of its anchor, W₀c_a, and keeps preserved embeddings c_p where they were:

    W* = (λW₀ + s_e Σ W₀ c_a c_eᵀ + s_p Σ W₀ c_p c_pᵀ)(λI + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ)⁻¹.

The right-hand factor does not depend on W₀, so W* = W₀ M with one d × d matrix M shared by
every projection of the same input width: one solve for all matrices and all concepts. The
preserve terms cancel in M − I = s_e (C_a − C_e)ᵀ C_e D⁻¹ (rows of C: embeddings, D the
denominator), so each update ΔW = (W₀ U) V has rank at most the number of erased embeddings.

RECE (Gong et al., 2024) then asks which embedding c′ the edited projections still map to
the original output of c, c′ = (Σ W′ᵀW′ + λ_reg I)⁻¹ Σ W′ᵀW₀ c, erases c′ to the anchor too,
and repeats. With G = Σ W₀ᵀW₀ this is c′ = (MᵀGM + λ_reg I)⁻¹ MᵀG c, again d × d only, and
the erased rows enter the next solve through two d × d sums, so a round's cost stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from patcher.adapters.unet import UNetAdapter
from patcher.errors import PatcherError
from patcher.methods import Deltas, EditInputs, register
from patcher.methods.linalg import guarded_solve
from patcher.settings import setting
from patcher.spec import Spec


@dataclass(frozen=True)
class UCEConfig:
    """UCE's [erase] keys, with UCE's published defaults."""

    uce_lambda: float = setting(0.5, "λ: weight of keeping every projection as it is")
    erase_scale: float = setting(1.0, "weight of mapping each erased concept onto its anchor")
    preserve_scale: float = setting(1.0, "weight of keeping the preserved concepts' outputs")
    preserve_prefix: bool = setting(
        True, "also keep the outputs of each template's tokens before the concept slot (UCE's own form: false)"
    )


@dataclass(frozen=True)
class RECEConfig(UCEConfig):
    """RECE's [erase] keys: UCE's, and the rounds of erasing regenerating embeddings
    (defaults: RECE's nudity setting)."""

    rece_rounds: int = setting(3, "rounds of finding and erasing the embedding that regenerates the concept")
    rece_regularization: float = setting(0.1, "regularization of the closed-form embedding search")


Factors = tuple[torch.Tensor, torch.Tensor]  # (U (d, n), V (n, d)): M − I = U V


def _solve_right(erased_gram: torch.Tensor, preserve: torch.Tensor, rhs: torch.Tensor, hp: UCEConfig) -> torch.Tensor:
    """rhs D⁻¹ for UCE's symmetric denominator D = λI + s_e Σ c_e c_eᵀ + s_p Σ c_p c_pᵀ; rhs (n, d)."""
    eye = torch.eye(erased_gram.shape[0], dtype=torch.float64)
    denominator = hp.uce_lambda * eye + hp.erase_scale * erased_gram + hp.preserve_scale * preserve.T @ preserve
    return guarded_solve(denominator, rhs.T, "UCE's system").T


def uce_factors(
    erase: torch.Tensor, anchors: torch.Tensor, preserve: torch.Tensor, hp: UCEConfig = UCEConfig()
) -> Factors:
    """U, V with M = I + U V. erase, anchors: (n_e, d) row embeddings, pairwise; preserve: (n_p, d)."""
    erase, anchors, preserve = erase.double(), anchors.double(), preserve.double()
    return hp.erase_scale * (anchors - erase).T, _solve_right(erase.T @ erase, preserve, erase, hp)  # C_e D⁻¹


def uce_transform(
    erase: torch.Tensor, anchors: torch.Tensor, preserve: torch.Tensor, hp: UCEConfig = UCEConfig()
) -> torch.Tensor:
    """M (d, d) with W* = W₀ M."""
    left, right = uce_factors(erase, anchors, preserve, hp)
    return torch.eye(left.shape[0], dtype=torch.float64) + left @ right


def inverted_embeddings(
    transform: torch.Tensor, gram: torch.Tensor, concepts: torch.Tensor, regularization: float
) -> torch.Tensor:
    """RECE's c′ for each row c of `concepts`, against projections W′ = W₀ M with Σ W₀ᵀW₀ = `gram`."""
    transform, gram, concepts = transform.double(), gram.double(), concepts.double()
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    system = transform.T @ gram @ transform + regularization * eye
    return guarded_solve(system, transform.T @ gram @ concepts.T, "RECE's inversion").T


def rece_factors(
    erase: torch.Tensor,
    anchors: torch.Tensor,
    preserve: torch.Tensor,
    gram: torch.Tensor,
    rounds: int,
    regularization: float,
    hp: UCEConfig = UCEConfig(),
) -> Factors:
    """UCE's factors after `rounds` of RECE: each round also erases, to the concept's anchor,
    the embedding that still regenerates the concept.

    UCE's solve depends on the erased rows only through X = Σ (c_a − c_e) c_eᵀ and Σ c_e c_eᵀ,
    so each round adds its rows to these d × d sums: a round costs the same however many
    came before. The result is returned as (M − I, I), of rank at most d.
    """
    erase, anchors, preserve = erase.double(), anchors.double(), preserve.double()
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    cross, erased_gram = (anchors - erase).T @ erase, erase.T @ erase
    for _ in range(rounds):
        transform = eye + hp.erase_scale * _solve_right(erased_gram, preserve, cross, hp)
        recovered = inverted_embeddings(transform, gram, erase, regularization)
        cross = cross + (anchors - recovered).T @ recovered
        erased_gram = erased_gram + recovered.T @ recovered
    return hp.erase_scale * _solve_right(erased_gram, preserve, cross, hp), eye


def projection_deltas(weights: dict[str, torch.Tensor], factors: Factors) -> dict[str, torch.Tensor]:
    """ΔW = (W₀ U) V for each (out, in) projection weight, in the weight's own dtype.

    The factors come from float64 solves; the products run in fp32 (fp64 weights stay
    fp64), a rounding error of ~1e-7 of the delta's norm.
    """
    deltas = {}
    for name, w in weights.items():
        compute = torch.float64 if w.dtype == torch.float64 else torch.float32
        left, right = (f.to(compute) for f in factors)
        deltas[name] = ((w.to(compute) @ left) @ right).to(w.dtype)
    return deltas


def concept_rows(
    adapter: UNetAdapter, spec: Spec, preserve_prefix: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erase, anchors, preserve) row embeddings of the spec's concepts in its templates.

    Erase and anchor rows pair up position by position from each concept's last token on
    (the shorter prompt sets the count); preserve rows are every preserved concept's, and
    with `preserve_prefix` each template's rows before the slot. Those rows are the same in
    every prompt of the template, the concept's too, so nothing in the erased rows' span
    pins them, and the update moves them with the erased rows' shared directions.
    """
    if not spec.concepts:
        raise PatcherError("the spec has no [[concept]] entries: name the concepts to erase")
    erase, anchors = [], []
    for entry in spec.concepts:
        concept, anchor = entry["erase"], entry.get("anchor", "")
        if anchor.strip().lower() == concept.strip().lower():
            raise PatcherError(f"the anchor of {concept!r} is the concept itself: anchor it to what should replace it")
        pairs = zip(
            adapter.concept_embeddings(concept, spec.templates),
            adapter.concept_embeddings(anchor, spec.templates, allow_empty=True),
            strict=True,
        )
        for erased, anchored in pairs:
            count = min(len(erased), len(anchored))
            erase.append(erased[:count])
            anchors.append(anchored[:count])
    preserve = [
        rows for entry in spec.preserve for rows in adapter.concept_embeddings(entry["concept"], spec.templates)
    ]
    if preserve_prefix:
        preserve += [adapter.prefix_embeddings(template) for template in spec.templates]
    width = erase[0].shape[1]
    preserve_rows = torch.cat(preserve) if preserve else torch.zeros(0, width, dtype=torch.float64)
    return torch.cat(erase), torch.cat(anchors), preserve_rows


def _projection_weights(adapter: UNetAdapter) -> dict[str, torch.Tensor]:
    return {adapter.param_name(name): module.weight.detach() for name, module in adapter.projections.items()}


@register("uce", UCEConfig, ("t2i-unet",))
def uce(inputs: EditInputs) -> Deltas:
    """UCE over every cross-attention K/V projection, all concepts in one solve."""
    rows = concept_rows(inputs.adapter, inputs.spec, inputs.config.preserve_prefix)
    factors = uce_factors(*rows, inputs.config)
    return projection_deltas(_projection_weights(inputs.adapter), factors)


@register("rece", RECEConfig, ("t2i-unet",))
def rece(inputs: EditInputs) -> Deltas:
    """UCE, then `rece_rounds` rounds of erasing RECE's regenerating embeddings."""
    weights = _projection_weights(inputs.adapter)
    gram = sum(w.double().T @ w.double() for w in weights.values())
    factors = rece_factors(
        *concept_rows(inputs.adapter, inputs.spec, inputs.config.preserve_prefix),
        gram,
        rounds=inputs.config.rece_rounds,
        regularization=inputs.config.rece_regularization,
        hp=inputs.config,
    )
    return projection_deltas(weights, factors)
