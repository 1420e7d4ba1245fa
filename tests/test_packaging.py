"""The wheel: built from a copy of the tree with a new room added (a subpackage with static
files), it holds every module of every folder pyproject's package-dir maps and the package
data; the Dockerfiles install the project instead of listing its folders."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
SKIP = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "tests",
    "docs",
    "benchmarks",
    "mris-demo",
    "demo-cohort",
    ".whl",
    ".gl",
)
# a room that does not exist yet: a subpackage, a nested one, and static files without __init__
NEW_ROOM = {
    "mris/viewer/__init__.py": '"""The viewer (test placeholder)."""\n',
    "mris/viewer/static/index.html": "<!doctype html><title>viewer</title>\n",
    "mris/viewer/static/js/app.js": "export const ready = true;\n",
    "mris/batch/__init__.py": "",
    "mris/batch/engines/__init__.py": "",
    "mris/batch/engines/ray_engine.py": "ENGINE = 'ray'\n",
}


def package_dir() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def expected_modules(tree: Path) -> set[str]:
    """Wheel paths of every .py file in every package below each mapped folder."""
    paths = set()
    for name, folder in package_dir().items():
        root = tree / folder
        for file in root.rglob("*.py"):
            if all((parent / "__init__.py").is_file() for parent in _parents(file, root)):
                relative = file.relative_to(root).as_posix()
                paths.add(f"{name.replace('.', '/')}/{relative}")
    return paths


def _parents(file: Path, root: Path) -> list[Path]:
    parents, folder = [], file.parent
    while True:
        parents.append(folder)
        if folder == root:
            return parents
        folder = folder.parent


def _pip_wheel_args() -> list[str]:
    """Build in this environment when its setuptools can (offline); else pip's isolated build,
    which fetches pyproject's build requirements."""
    try:
        import setuptools

        major = int(setuptools.__version__.split(".")[0])
        if major >= 70 or (major >= 69 and _has("wheel")):
            return ["--no-build-isolation"]
    except ImportError:
        pass
    return []


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    tree = tmp_path_factory.mktemp("tree") / "mris-src"
    shutil.copytree(REPO, tree, ignore=SKIP)
    for name, text in NEW_ROOM.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text(text)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            *_pip_wheel_args(),
            "-w",
            str(out),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (built,) = out.glob("mris-*.whl")
    with zipfile.ZipFile(built) as archive:
        return tree, set(archive.namelist())


def test_wheel_holds_every_module_of_every_mapped_folder(wheel):
    tree, names = wheel
    modules = expected_modules(tree)
    assert {
        "mris/index/card.py",
        "mris/service/__init__.py",
        "mris/cohort/__init__.py",
        "mris/training/run.py",
        "mris/batch/engines/ray_engine.py",
    } <= modules
    assert not modules - names, sorted(modules - names)
    assert not [n for n in names if n.split("/")[0] in ("index", "training", "service")]


def test_wheel_holds_package_data(wheel):
    _, names = wheel
    assert {"mris/viewer/static/index.html", "mris/viewer/static/js/app.js"} <= names


def test_dockerfiles_install_the_project_not_a_list_of_folders():
    folders = set(package_dir().values())
    for dockerfile in (REPO / "docker").glob("Dockerfile*"):
        for line in dockerfile.read_text().splitlines():
            match = re.match(r"COPY\s+(?!--from)(.*)", line)
            if match:
                sources = match.group(1).split()[:-1]
                assert not folders & {s.strip("./") for s in sources}, (dockerfile.name, line)


def test_mris_version_is_the_installed_distribution():
    from importlib.metadata import version

    from typer.testing import CliRunner

    from mris.cli import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"mris {version('mris')}"
