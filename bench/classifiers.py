"""SSD on image classifiers of three layouts: ResNet, ViT and ConvNeXt, each trained as the
classifier fixture is.

    python bench/classifiers.py [--out bench/results/classifiers-cpu.csv]

Each model is the classifier fixture's recipe (eight coloured shapes, 16×16 images, 500
steps) with another `...ForImageClassification` in place of its ResNet, and the fixture's
spec: forget one class with SSD at the fixture's settings, keep the other seven. Each row:
test accuracy after training, training and erase seconds, and verify's figures for the
patched model. Prints a Markdown table and writes the rows as CSV.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
import warnings
from pathlib import Path

import patcher
from patcher.fixtures import write_classifier_spec
from patcher.fixtures.classifier import ARCHITECTURES, build_classifier_fixture

COLUMNS = ("arch", "test_accuracy", "train_s", "erase_s", "forget_accuracy", "retain_ratio", "passed")


def run_arch(arch: str, work: Path) -> dict:
    """Train a classifier of `arch`, erase the spec's class with SSD, apply and verify."""
    folder = work / arch
    start = time.perf_counter()
    trained = build_classifier_fixture(folder, arch)
    write_classifier_spec(folder)
    train_s = time.perf_counter() - start
    spec = patcher.load_spec(folder / "spec.toml")
    start = time.perf_counter()
    patch = patcher.erase(spec, folder)
    erase_s = time.perf_counter() - start
    patcher.apply(folder, patch, work / f"{arch}-patched")
    report = patcher.verify(folder, work / f"{arch}-patched", spec)
    row = report["formats"]["safetensors"]
    return {
        "arch": arch,
        "test_accuracy": f"{trained['test_accuracy']:.3f}",
        "train_s": f"{train_s:.1f}",
        "erase_s": f"{erase_s:.1f}",
        "forget_accuracy": f"{row['forget_accuracy']:.3f}",
        "retain_ratio": f"{row['retain_ratio']:.3f}",
        "passed": "pass" if report["passed"] else "fail",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/classifiers-cpu.csv"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run_arch(arch, Path(tmp)) for arch in ARCHITECTURES]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row[c] for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
