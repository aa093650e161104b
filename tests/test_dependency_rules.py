"""The layering the architecture docs promise, checked on the source: which part may import which.

Every import statement is read, the ones inside functions too, so a lazy import cannot
route around a rule. A toy tree that breaks each rule shows the check itself can fail.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the package it installs as (setup.py maps the same way).
ROOTS = {"patcher": "patcher", "kernels": "patcher.kernels", "formats": "patcher.formats"}
CLI = "patcher.cli"
# part -> the patcher packages it must not import.
FORBIDDEN = {
    "patcher.formats": (
        "patcher.methods",
        "patcher.verification",
        "patcher.families",
        "patcher.releasing",
        "patcher.api",
        CLI,
    ),
    "patcher.methods": ("patcher.verification", "patcher.families", "patcher.releasing", "patcher.api", CLI),
    "patcher.verification": ("patcher.methods", "patcher.families"),
    "patcher.attacks": ("patcher.methods", "patcher.verification", "patcher.families", "patcher.releasing", CLI),
}
# The one module allowed to import the CLI: `python -m patcher`.
CLI_LAUNCHER = "patcher.__main__"
KERNEL_THIRD_PARTY = {"torch", "triton"}


def module_name(root: Path, source: Path) -> str:
    """The dotted name `source` installs as."""
    relative = source.relative_to(root)
    parts = [ROOTS[relative.parts[0]], *relative.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: Path, module: str) -> set[str]:
    """Every module `source` imports, relative imports resolved against `module`."""
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(root: Path) -> list[str]:
    """One line per import that breaks a rule, as `module imports name`."""
    found = []
    for folder in ROOTS:
        for source in sorted((root / folder).rglob("*.py")):
            module = module_name(root, source)
            for name in sorted(imported_names(source, module)):
                if within(module, "patcher.kernels"):
                    top = name.split(".")[0]
                    allowed = within(name, "patcher.kernels") or top in KERNEL_THIRD_PARTY
                    if not allowed and top not in sys.stdlib_module_names and top != "__future__":
                        found.append(f"{module} imports {name}")
                    continue
                if within(name, CLI) and module != CLI_LAUNCHER and not within(module, CLI):
                    found.append(f"{module} imports {name}")
                    continue
                for part, banned in FORBIDDEN.items():
                    if within(module, part) and any(within(name, b) for b in banned):
                        found.append(f"{module} imports {name}")
    return found


def test_the_source_tree_keeps_every_dependency_rule():
    assert violations(REPO) == []


@pytest.mark.parametrize(
    ("path", "line", "expected"),
    [
        ("kernels/toy.py", "import numpy", "patcher.kernels.toy imports numpy"),
        ("kernels/toy.py", "from patcher.spec import Spec", "patcher.kernels.toy imports patcher.spec"),
        ("formats/toy.py", "from patcher.methods import memit", "patcher.formats.toy imports patcher.methods"),
        ("formats/toy.py", "from ..verification import report", "patcher.formats.toy imports patcher.verification"),
        ("patcher/methods/toy.py", "def f():\n    import patcher.api", "patcher.methods.toy imports patcher.api"),
        ("patcher/verification/toy.py", "from patcher.methods.memit import memit", "patcher.verification.toy imports"),
        ("patcher/verification/toy.py", "from patcher.families import family_of", "patcher.verification.toy imports"),
        ("patcher/demo.py", "from patcher.cli import main", "patcher.demo imports patcher.cli"),
    ],
)
def test_a_broken_rule_is_reported(tmp_path: Path, path: str, line: str, expected: str):
    for folder in ROOTS:
        (tmp_path / folder).mkdir()
    (tmp_path / "patcher" / "__main__.py").write_text("from patcher.cli import main\n")
    source = tmp_path / path
    source.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(line + "\n")
    found = violations(tmp_path)
    assert any(entry.startswith(expected) for entry in found), found
