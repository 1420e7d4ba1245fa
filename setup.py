"""The package list, derived from ``[tool.setuptools] package-dir`` in pyproject.toml.

Every other setting lives in pyproject.toml. The mapping there (import name -> folder) is the
one place that says which folders install: each mapped folder ships with every subpackage
below it (``find_packages``), so a new subpackage (``mris/viewer/``, ``mris/batch/``) needs no
edit here, in pyproject.toml or in the Dockerfiles; non-Python files ship by the package-data
patterns in pyproject.toml (e.g. ``mris/viewer/static/**``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import find_packages, setup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the build requirements add tomli on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent


def mapped_packages(package_dir: dict[str, str]) -> list[str]:
    """Each mapped package and every subpackage found in its folder, as installed names."""
    packages = set()
    for name, folder in package_dir.items():
        packages.add(name)
        packages.update(f"{name}.{sub}" for sub in find_packages(str(ROOT / folder)))
    return sorted(packages)


PACKAGE_DIR = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
    "package-dir"
]

setup(packages=mapped_packages(PACKAGE_DIR))
