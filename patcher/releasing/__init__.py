"""`patcher release`: one command from spec to shippable, verified artifacts."""

from patcher.releasing.run import Release, prepare, run_release

__all__ = ["Release", "prepare", "run_release"]
