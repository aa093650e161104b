"""Package discovery, the one part of the build pyproject.toml cannot declare.

The source keeps kernels/ and formats/ at the top level, but they install as
patcher.kernels and patcher.formats; every subpackage of the three folders is found here,
so a new one needs no list kept by hand.
"""

from setuptools import find_packages, setup

ROOTS = {"patcher": "patcher", "patcher.kernels": "kernels", "patcher.formats": "formats"}

packages = list(ROOTS)
packages += [f"{name}.{sub}" for name, folder in ROOTS.items() for sub in find_packages(folder)]
setup(packages=packages, package_dir=ROOTS)
