"""CI runs the README's test command and nothing else, and that command runs ruff."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if "python3 -m venv" in line]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    install, test = _readme_commands()[:2]
    assert ci == test
    assert "mris demo" in install


def test_the_test_command_installs_the_system_packages_and_extras_the_tests_need() -> None:
    """The PACS, the DICOM validator, the browser and the proxy (Debian), and the Python extras
    (``scale``: Ray, for the batch and index-build tests on a local Ray cluster)."""
    test = _readme_commands()[1]
    packages = "orthanc orthanc-dicomweb dicom3tools chromium nginx"
    assert test.startswith(f"dpkg -s {packages} ")
    assert f"apt-get install -y -qq {packages})" in test
    assert "pip install -q -e '.[train,dev,scale]'" in test


def test_the_test_command_lints_and_checks_formatting_before_the_tests() -> None:
    test = _readme_commands()[1]
    steps = [step.strip() for step in test.split("&&")]
    assert steps.index(".venv/bin/ruff check .") < steps.index(".venv/bin/python -m pytest -q")
    assert ".venv/bin/ruff format --check ." in steps
