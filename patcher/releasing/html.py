"""The release's report.html: one self-contained page (plots embedded as PNG) with the verdict,
the verification matrix, accuracy and recovery per format, and for text-to-image a grid of
images before and after the patch, per concept."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from typing import TYPE_CHECKING

from patcher.releasing.card import erased_items
from patcher.verification import matrix
from patcher.verification.grading import failures_by_format

if TYPE_CHECKING:
    from patcher.releasing.run import Release

GRID_SEEDS = 4
STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.pass{color:#176f2c}.fail{color:#b3261e;font-weight:bold}
.verdict{padding:.6em 1em;border-radius:6px}.verdict.pass{background:#e6f4ea}.verdict.fail{background:#fce8e6}
img{max-width:100%}"""
# Marks the page once every plot has decoded, so a headless browser can check it rendered.
IMAGES_LOADED = """<script>window.addEventListener("load", () => {
  document.body.dataset.imagesOk = [...document.images].every(i => i.complete && i.naturalWidth > 0);
});</script>"""


def _png(figure) -> str:
    """A matplotlib figure as an <img> with the PNG inlined."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{encoded}">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plot(report: dict) -> str:
    """Forget, paraphrase and retain accuracy per format, the base's as dashed lines."""
    plt = _pyplot()
    formats = list(report["formats"])
    metrics = ("forget_accuracy", "paraphrase_accuracy", "retain_accuracy")
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(formats)), 3.2))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        values = [report["formats"][f][metric] or 0.0 for f in formats]
        bars = axis.bar([x + i * width for x in range(len(formats))], values, width, label=metric.split("_")[0])
        if report["base"][metric] is not None:
            axis.axhline(report["base"][metric], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    axis.set_xticks([x + width for x in range(len(formats))], formats)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("accuracy (dashed: base)")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axis.set_title("Forget and retain accuracy per format")
    return _png(figure)


def recovery_plot(report: dict) -> str:
    """Recovery per format against the spec's gate."""
    plt = _pyplot()
    formats = list(report["formats"])
    values = [report["formats"][f]["recovery"] for f in formats]
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(formats)), 2.8))
    colours = ["#b3261e" if not report["formats"][f]["passed"] else "#176f2c" for f in formats]
    bars = axis.bar(formats, values, color=colours)
    axis.bar_label(bars, fmt="%.3f", fontsize=8)  # a zero recovery would otherwise show nothing
    gate = report["gates"].get("max_recovery")
    if gate is not None:
        axis.axhline(gate, color="black", linestyle=":", linewidth=1, label=f"gate {gate}")
        axis.legend(fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("recovery")
    axis.set_title("Share of the erased knowledge that comes back, per format")
    return _png(figure)


def attack_plot(report: dict) -> str:
    """Forget, paraphrase and retain accuracy after each attack (and any other figure an attack
    gates), each attack's gate drawn over the bar it bounds."""
    plt = _pyplot()
    attacks = report["attacks"]
    gated = [matrix.gated_figure(a) for a in attacks.values()]
    metrics = ("forget_accuracy", "paraphrase_accuracy", "retain_accuracy")
    metrics += tuple(dict.fromkeys(f for f in gated if f not in metrics))
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(attacks)), 3.2))
    width = 0.8 / len(metrics)
    for i, metric in enumerate(metrics):
        values = [attacks[a].get(metric) or 0.0 for a in attacks]
        bars = axis.bar([x + i * width for x in range(len(attacks))], values, width, label=metric.replace("_", " "))
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    for x, (attack, figure_key) in enumerate(zip(attacks.values(), gated, strict=True)):
        limit = attack.get(f"max_{figure_key}")
        if limit is not None:
            left = x + metrics.index(figure_key) * width - width / 2
            label = "gate" if x == 0 else None
            axis.hlines(limit, left, left + width, colors="black", linestyles=":", linewidth=1.5, label=label)
    axis.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(attacks))], list(attacks))
    axis.set_ylim(0, 1.1)
    axis.set_ylabel("after the attack")
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    axis.set_title("What each attack brings back (budgets in the table's notes)")
    return _png(figure)


def probe_plot(per_layer: list[dict]) -> str:
    """The probe's accuracy on the forget answers per layer, read from the base and the patch."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 2.8))
    layers = [row["layer"] for row in per_layer]
    for key, style in (("base", "--"), ("patched", "-")):
        axis.plot(layers, [row[key] for row in per_layer], style, marker="o", label=key)
    axis.set_xticks(layers)
    axis.set_xlabel("hidden state (0: embeddings, L: after decoder layer L - 1)")
    axis.set_ylim(0, 1.05)
    axis.set_ylabel("forget answers read")
    axis.legend(fontsize=8)
    axis.set_title("Linear probe per layer: knowledge left in the hidden states")
    return _png(figure)


def image_grid(release: Release) -> str:
    """Images of each erased and preserved concept (the first verify prompt, fixed seeds), before and after."""
    from patcher.drawing import generate_images, prompts_for
    from patcher.models import load_pipeline

    plt = _pyplot()
    spec = release.spec
    checks = dataclasses.replace(spec.images, images_per_prompt=GRID_SEEDS)
    pipes = {"base": load_pipeline(release.base), "patched": load_pipeline(release.artifacts["safetensors"])}
    concepts = [(c["erase"], "erased") for c in spec.concepts] + [(p["concept"], "kept") for p in spec.preserve]
    figure, axes = plt.subplots(2 * len(concepts), GRID_SEEDS, figsize=(1.4 * GRID_SEEDS, 1.5 * 2 * len(concepts)))
    rows = [(concept, role, label, pipe) for concept, role in concepts for label, pipe in pipes.items()]
    for row, (concept, role, label, pipe) in enumerate(rows):
        images = generate_images(pipe, prompts_for(concept, spec.images.prompts[:1]), checks)
        for column, image in enumerate(images):
            axis = axes[row, column]
            pixels = ((image.permute(1, 2, 0) + 1) / 2).clamp(0, 1).float().numpy()
            axis.imshow(pixels, interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row, 0].set_ylabel(f"{concept} ({role})\n{label}", fontsize=7)
    figure.suptitle(f"'{spec.images.prompts[0]}', seeds 0-{GRID_SEEDS - 1}: base and patched", fontsize=9)
    return _png(figure)


def report_html(release: Release) -> str:
    """The whole page."""
    report, spec = release.report, release.spec
    passed = report["passed"]
    verdict = "passed every gate" if passed else "FAILED: " + ", ".join(failures_by_format(report))
    items = "".join(f"<li>{html.escape(item.replace('`', ''))}</li>" for item in erased_items(release))
    sections = [
        f"<h1>patcher release: {html.escape(release.base.name)}</h1>",
        f'<p class="verdict {"pass" if passed else "fail"}">{html.escape(verdict)}</p>',
        f"<p>Base <code>{html.escape(str(release.base))}</code>, fingerprint "
        f"<code>{html.escape(report.get('base_fingerprint', 'not recorded'))}</code>; method "
        f"<code>{html.escape(spec.method)}</code>.</p>",
        f"<h2>Erased</h2><ul>{items}</ul>",
        f"<h2>Verification</h2>{matrix.as_html(report)}",
        f"<h2>Accuracy per format</h2>{accuracy_plot(report)}",
        f"<h2>Recovery per format</h2>{recovery_plot(report)}",
    ]
    if report.get("attacks"):
        sections.append(f"<h2>Attacks</h2>{attack_plot(report)}")
        sections += [probe_plot(row["per_layer"]) for row in report["attacks"].values() if "per_layer" in row]
    if release.family.shows_images:
        sections.append(f"<h2>Images before and after</h2>{image_grid(release)}")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>patcher release report</title>'
        f"<style>{STYLE}</style>{IMAGES_LOADED}</head><body>{''.join(sections)}</body></html>\n"
    )
