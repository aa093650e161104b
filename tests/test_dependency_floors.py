"""The floors pyproject.toml declares are the versions `.ci/floors` installs and tests."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
UNTESTED = {"torch"}  # only the 2.13.0 CPU wheel installs on the CI machine


def declared_floors() -> dict[str, str]:
    """Each runtime dependency's name and the version its `>=` names."""
    floors = {}
    for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        (specifier,) = requirement.specifier
        assert specifier.operator == ">=", f"{line}: a floor is declared as >=, nothing else"
        floors[canonicalize_name(requirement.name)] = specifier.version
    return floors


def pinned_floors() -> dict[str, str]:
    lines = (ROOT / ".ci" / "floors.txt").read_text().split()
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines)}


def test_every_declared_floor_is_the_version_the_floor_job_tests():
    declared = {name: version for name, version in declared_floors().items() if name not in UNTESTED}
    assert pinned_floors() == declared
