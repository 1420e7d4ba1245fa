"""The DICOM-level fuzzer, bounded for the test run (tests/fuzz/dicom_fuzz.py has the long run):
mutated real DICOMs of every transfer syntax through ``read_radiograph`` (in the decode sandbox)
and through a real ``mris serve``; only a result or a typed error / 4xx problem+json, in time,
without a planted identifier. The known hostile files and every saved regression are replayed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from dicom_fuzz import TOKEN, campaign, regression_files
from serve_process import ServeProcess, tiny_bundle

from mris.sandbox import DecodeSandbox

CASES = int(os.environ.get("MRIS_FUZZ_CASES", "1200"))


@pytest.fixture(scope="module")
def fuzz_targets(tmp_path_factory):
    model, index = tiny_bundle(tmp_path_factory.mktemp("fuzz"))
    with (
        ServeProcess(model, index, {"MRIS_API_TOKEN": TOKEN}) as server,
        DecodeSandbox() as sandbox,
    ):
        yield server, sandbox


def test_known_hostile_files_and_saved_regressions(fuzz_targets):
    server, sandbox = fuzz_targets
    files = regression_files()
    assert {
        "jpeg-ls-sof55-zero-lines",
        "jpeg-extended-sof1-zero-lines",
        "dx-32-bit-float-values",
    } <= set(files)
    tally = campaign(server, sandbox, seed=0, count=0, save=False, extra=files)
    assert tally.cases == len(files)
    assert not tally.findings, tally.findings
    assert tally.outcomes["http-400"] >= 3  # the three hostile files, refused as unreadable


def test_mutated_dicoms_give_only_results_or_typed_errors(fuzz_targets, tmp_path):
    server, sandbox = fuzz_targets
    before = server.rss_mb()
    tally = campaign(server, sandbox, seed=20261202, count=CASES, save=True)
    print(tally.line())
    assert tally.cases == CASES
    assert not tally.findings, tally.findings[:5]
    # The fuzzer reached every outcome class, not only the first refusal.
    assert tally.outcomes["read-ok"] > CASES // 10 and tally.outcomes["http-200"] > 0
    assert tally.outcomes["http-400"] > 0 and tally.outcomes["http-422"] > 0
    assert server.rss_mb() - before < 150, "the server's memory stays bounded"
