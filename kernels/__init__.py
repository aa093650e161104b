"""Statistics kernels. Import as `from patcher import kernels`."""

from patcher.kernels.second_moment import second_moment, second_moment_reference

__all__ = ["second_moment", "second_moment_reference"]
