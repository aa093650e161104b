"""`patcher release`: one command from spec to shippable, verified artifacts."""

from patcher.release.run import Release, prepare, run_release

__all__ = ["Release", "prepare", "run_release"]
