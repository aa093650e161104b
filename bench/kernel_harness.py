"""What every kernel benchmark shares: timing, the device's measured peaks, CSV, table and plot.

On CUDA, times are `triton.testing.do_bench` medians; on CPU, medians of wall-clock repeats
of the torch providers (the Triton interpreter is a correctness tool, not a timed one).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Device:
    """Where a benchmark runs, with the peaks its rates are compared to."""

    torch_device: torch.device
    label: str  # file-name tag: h100, h200, cpu, ...
    name: str
    peak_tflops: float  # measured: a large bf16 (GPU) / fp32 (CPU) matrix product
    peak_gbps: float  # measured: a large device-to-device copy, bytes read + written

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.type == "cuda"


@dataclass
class Results:
    """Rows of one benchmark run; written as CSV, printed as a ratio table, drawn as a plot."""

    op: str
    device: Device
    rows: list[dict] = field(default_factory=list)

    def add(self, provider: str, shape: str, ms: float, flops: float = 0.0, bytes_moved: float = 0.0, **extra):
        row = {"op": self.op, "provider": provider, "shape": shape, "ms": round(ms, 4)}
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 2)
            row["peak_flops_share"] = round(flops / ms / 1e9 / self.device.peak_tflops, 3)
        if bytes_moved:
            row["gbps"] = round(bytes_moved / ms / 1e6, 1)
            row["peak_bw_share"] = round(bytes_moved / ms / 1e6 / self.device.peak_gbps, 3)
        row.update(extra)
        self.rows.append(row)

    def write(self, reference: str, out: Path | None = None) -> Path:
        """Add each row's speedup over `reference` at the same shape, write CSV and plot, print the table."""
        base = {r["shape"]: r["ms"] for r in self.rows if r["provider"] == reference}
        for row in self.rows:
            row["speedup_vs_" + reference] = round(base[row["shape"]] / row["ms"], 2) if row["shape"] in base else ""
            row.update(device=self.device.name, commit=commit(), host=platform.node())
        out = out or RESULTS / f"{self.op}-{self.device.label}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        print(self.table(reference))
        plot(self.rows, reference, out.with_suffix(".png"), f"{self.op} on {self.device.name}")
        print(f"wrote {out} and {out.with_suffix('.png').name}")
        return out

    def table(self, reference: str) -> str:
        header = f"| shape | provider | ms | TFLOP/s | GB/s | x {reference} |"
        lines = [f"{self.op} on {self.device.name} (peaks: {self.device.peak_tflops:.3g} TFLOP/s, "
                 f"{self.device.peak_gbps:.3g} GB/s measured)", header, "|" + "---|" * 6]  # fmt: skip
        for r in self.rows:
            lines.append(
                f"| {r['shape']} | {r['provider']} | {r['ms']:.3f} | {r.get('tflops', '')} | "
                f"{r.get('gbps', '')} | {r.get('speedup_vs_' + reference, '')} |"
            )
        return "\n".join(lines)


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=None, help="CSV path (default bench/results/<op>-<device>.csv)")
    args = parser.parse_args()
    if args.quick and args.out is None:  # a smoke run never overwrites measured results
        args.out = Path(tempfile.gettempdir()) / "patcher-bench-quick" / f"{Path(sys.argv[0]).stem}.csv"
    return args


def run_shapes(
    op: str,
    reference: str,
    measure: Callable[..., None],
    shapes: dict[str, list[tuple]],
    doc: str,
    script: str,
) -> None:
    """A kernel benchmark's main: pick the device's shapes (`cuda`, `cpu`, `quick`), check the
    kernel under the interpreter when there is no GPU, measure each shape, write the results."""
    args = parse_args(doc)
    device = detect_device()
    results = Results(op, device)
    if not device.is_cuda:
        interpreter_check(Path(script))
    chosen = shapes["quick"] if args.quick else shapes["cuda" if device.is_cuda else "cpu"]
    for shape in chosen:
        measure(results, *shape)
    results.write(reference, args.out)


def detect_device() -> Device:
    """The benchmark's device, with its matrix-product and copy peaks measured now."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        peak_tflops = 2 * 8192**3 / time_ms(lambda: a @ a, device) / 1e9
        big = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        peak_gbps = 2 * big.numel() / time_ms(lambda: big.clone(), device) / 1e6
        del a, big
    else:
        device = torch.device("cpu")
        name = platform.processor() or platform.machine() or "cpu"
        a = torch.randn(1024, 1024)
        peak_tflops = 2 * 1024**3 / time_ms(lambda: a @ a, device) / 1e9
        big = torch.empty(1 << 27, dtype=torch.uint8)
        peak_gbps = 2 * big.numel() / time_ms(lambda: big.clone(), device) / 1e6
    label = "cpu" if device.type == "cpu" else (re.search(r"[A-Z]\d{2,3}", name) or re.search(r"\w+", name))[0]
    return Device(device, label.lower(), name, peak_tflops, peak_gbps)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds of `fn`."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float | str:
    """Peak memory `fn` allocates beyond what was live before it (CUDA only)."""
    if device.type != "cuda":
        return ""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated(device) - before) / 2**20, 1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def interpreter_check(script: Path) -> None:
    """Run `script`'s `--check` mode with Triton interpreted, so a CPU run still checks the kernel."""
    env = dict(os.environ, TRITON_INTERPRET="1", PATCHER_KERNELS="triton")
    subprocess.run([sys.executable, str(script), "--check"], env=env, check=True)


def commit() -> str:
    if os.environ.get("PATCHER_COMMIT"):
        return os.environ["PATCHER_COMMIT"]
    try:
        root = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def plot(rows: list[dict], reference: str, path: Path, title: str) -> None:
    """Bar chart of milliseconds per provider and shape (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(shapes)), 4))
    for i, provider in enumerate(providers):
        ms = {r["shape"]: r["ms"] for r in rows if r["provider"] == provider}
        xs = [s + i * width for s, shape in enumerate(shapes) if shape in ms]
        ax.bar(xs, [ms[shape] for shape in shapes if shape in ms], width, label=provider)
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, lower is better)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
