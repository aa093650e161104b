"""`patcher stats` as a library call: one process, or every rank of a torchrun launch.

Each rank loads the model on its device, takes its contiguous slice of the corpus, collects
its sums (resuming from its own checkpoint when asked), and the sums are added over ranks;
rank 0 writes the file. Per-token and per-sample sums do not depend on how the corpus is
split, so N processes give the single-process statistics up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patcher.adapters import causal_lm_adapter
from patcher.errors import PatcherError
from patcher.families.causal_lm import resolve_layers
from patcher.imagesets import ImageSet
from patcher.models import detect_family, load_causal_lm, load_classifier, model_fingerprint, resolve_model_dir
from patcher.spec import load_spec
from patcher.stats import (
    FisherDiagonals,
    collect_fisher,
    collect_second_moments,
    corpus_batches,
    read_corpus,
    stats_cache_key,
)
from patcher.stats.collect import SecondMoments
from patcher.stats.distributed import World, join_world
from patcher.stats.per_sample import classifier_loss, per_sample_fisher
from patcher.stats.resume import Checkpointer

KINDS = ("second-moment", "fisher", "fisher-batch-mean")


@dataclass(frozen=True)
class StatsRun:
    """What a collection did: its kind, layers, tokens or samples over all ranks, where this
    rank resumed, and whether this process wrote the file (rank 0)."""

    kind: str
    layers: list[int]
    count: int
    resumed_tokens: int
    world_size: int
    written: bool

    @property
    def unit(self) -> str:
        """What `count` counts."""
        return {"second-moment": "tokens", "fisher-batch-mean": "batches"}.get(self.kind, "samples")

    def summary(self, out: Path) -> str:
        what = "second moments" if self.kind == "second-moment" else f"{self.kind} diagonals"
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        where = f"layers {self.layers}" if self.layers else "every parameter"
        resumed = f" (resumed after {self.resumed_tokens} tokens)" if self.resumed_tokens else ""
        return f"{what} of {where} over {self.count} {self.unit}{ranks}{resumed} -> {out}"


def partial_path(out: Path, world: World) -> Path:
    """Where a rank checkpoints its partial sums: beside the output, one file per rank."""
    rank = f".rank{world.rank}of{world.size}" if world.size > 1 else ""
    return out.with_name(f"{out.name}{rank}.partial")


def run_stats(
    model: str,
    corpus: Path,
    out: Path,
    layers: str | list[int] = "auto",
    spec_path: Path | None = None,
    kind: str = "second-moment",
    batch_size: int = 32,
    checkpoint_every: int | None = None,
) -> StatsRun:
    """Collect `kind` statistics of the chosen layers' down-projections over `corpus` into `out`
    (an image classifier: the per-sample Fisher of every parameter over the image set `corpus`).

    `checkpoint_every` (tokens) saves this rank's partial sums atomically, so a rerun with
    the same arguments after a crash resumes where the last save left off.
    """
    if kind not in KINDS:
        raise PatcherError(f"unknown statistics kind {kind!r}: use one of {', '.join(KINDS)}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise PatcherError("--checkpoint-every is a number of tokens: give a positive number")
    world = join_world()
    folder = resolve_model_dir(model)
    family = detect_family(folder)
    if family not in COLLECTORS:
        raise PatcherError(
            f"{folder} is a {family} model: `patcher stats` collects for {' and '.join(COLLECTORS)} models "
            "(text-to-image edits, uce and rece, read no statistics)"
        )
    job = StatsJob(folder, corpus, out, layers, spec_path, kind, batch_size, checkpoint_every, world)
    stats, chosen, count, checkpointer = COLLECTORS[family](job)
    if world.is_main:
        stats.save(out)
    world.leave()
    resumed = checkpointer.restored.tokens if checkpointer is not None else 0
    if checkpointer is not None:
        checkpointer.discard()
    return StatsRun(kind, chosen, count, resumed, world.size, world.is_main)


@dataclass(frozen=True)
class StatsJob:
    """What `run_stats` was asked for, on this rank."""

    folder: Path
    corpus: Path
    out: Path
    layers: str | list[int]
    spec_path: Path | None
    kind: str
    batch_size: int
    checkpoint_every: int | None
    world: World


# (statistics, layers, tokens or samples over all ranks, this rank's checkpointer or None)
Collected = tuple[SecondMoments | FisherDiagonals, list[int], int, Checkpointer | None]


def _lm_statistics(job: StatsJob) -> Collected:
    """Second moments or Fisher of the chosen layers' down-projections over a text corpus."""
    world = job.world
    lm, tokenizer = load_causal_lm(job.folder)
    adapter = causal_lm_adapter(lm.to(world.device()))
    facts = load_spec(job.spec_path).forget if job.spec_path is not None else None
    chosen = resolve_layers(job.layers, adapter, tokenizer, facts)
    lines = world.slice(read_corpus(job.corpus))
    checkpointer = None
    if job.checkpoint_every is not None:
        fingerprint = stats_cache_key(model_fingerprint(job.folder), lines, chosen)
        run_key = f"{fingerprint}/{job.kind}/{job.batch_size}/{world}"
        checkpointer = Checkpointer(partial_path(job.out, world), job.checkpoint_every, run_key)
    batches, total = corpus_batches(tokenizer, lines, job.batch_size), -(-len(lines) // job.batch_size)
    if job.kind == "second-moment":
        stats = collect_second_moments(adapter, batches, chosen, total, checkpointer)
        stats.token_count = count = world.sum_(stats.sums, stats.token_count)
    else:
        stats = collect_fisher(adapter, batches, chosen, total, job.kind == "fisher-batch-mean", checkpointer)
        stats.sample_count = count = world.sum_(stats.sums, stats.sample_count)
    return stats, chosen, count, checkpointer


def _classifier_fisher(job: StatsJob) -> Collected:
    """Per-sample Fisher of every parameter of an image classifier over an image set, summed over ranks."""
    if job.kind != "fisher":
        raise PatcherError(f"a classifier's statistics are its per-sample Fisher: use --kind fisher, not {job.kind}")
    if job.checkpoint_every is not None:
        raise PatcherError("--checkpoint-every applies to causal-LM corpora: a classifier's pass is not checkpointed")
    world, device = job.world, job.world.device()
    classifier = load_classifier(job.folder).to(device).eval()
    data = ImageSet.load(job.corpus)
    mine = tuple(world.slice(t).to(device) for t in (data.pixel_values, data.labels))
    sums = per_sample_fisher(classifier, classifier_loss, mine)
    stats = FisherDiagonals(sums, world.sum_(sums, len(mine[0])), "fisher")
    return stats, [], stats.sample_count, None


# The model family (patcher.models.detect_family) -> how `patcher stats` collects for it.
COLLECTORS = {"causal-lm": _lm_statistics, "classifier": _classifier_fisher}
