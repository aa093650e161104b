"""The wheel users install holds every package of the source tree, under the names the
code imports (kernels/ and formats/ as patcher.kernels and patcher.formats)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLED_AS = {"patcher": "patcher", "kernels": "patcher/kernels", "formats": "patcher/formats"}


def source_modules() -> set[str]:
    """Every module of the three source folders, as its path inside the wheel."""
    modules = set()
    for folder, installed in INSTALLED_AS.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "__pycache__" not in path.parts:
                modules.add(f"{installed}/{path.relative_to(ROOT / folder).as_posix()}")
    return modules


def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    # Built from a copy: a build/ folder an earlier build left in the checkout would be reused.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in INSTALLED_AS:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source), "-w"]
    subprocess.run([*build, str(tmp_path)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("patcher-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    assert source_modules() - shipped == set()
    assert "patcher/releasing/run.py" in shipped and "patcher/kernels/__init__.py" in shipped


def test_python_m_patcher_runs_from_the_root_of_a_checkout(tmp_path):
    # From a checkout's root `import patcher` finds the source folder, whatever is installed;
    # its patcher.formats and patcher.kernels must then come from the same checkout.
    for name in ("setup.py", *INSTALLED_AS):
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, tmp_path / name)
    probe = "import patcher.formats.patch as f, patcher.kernels as k; print(f.__file__); print(k.__file__)"
    imported = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert [Path(line).parent.parent for line in imported.stdout.split()] == [tmp_path, tmp_path]
    cli = subprocess.run([sys.executable, "-m", "patcher", "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0 and "erase" in cli.stdout
