"""API fuzzing of a real ``mris serve`` subprocess (schemathesis, see tests/fuzz/api_fuzz.py for
what is generated and checked), bounded for CI, and the replay of every saved failing request
in tests/fuzz/failures/api/ as a regression test.

The cases are generated from the app's OpenAPI document, built in-process at import (pytest
collects one test per route from it; ``test_served_schema_is_the_tested_one`` checks that the
server serves the same document), and sent to the subprocess. The generation is seeded
(``MRIS_API_FUZZ_SEED``) so a CI failure reproduces; ``MRIS_API_FUZZ_EXAMPLES`` sets the number
of fuzzed examples per route (the examples and coverage phases add their own). The long run
with random seeds is ``python tests/fuzz/api_fuzz.py --seconds N``. In CI (``CI=true``) a
missing schemathesis fails the run instead of skipping it.
"""

from __future__ import annotations

import json
import os
import random

import httpx
import pytest
from conftest import require

require("schemathesis")

# after require(): without schemathesis the module is skipped (fails in CI)
from fuzz.api_fuzz import (  # noqa: E402
    FAILURES,
    TOKEN,
    UNGUARDED,
    Stats,
    check_replayed,
    load_schema,
    openapi_document,
    replay,
    run_case,
)
from fuzz.api_fuzz import (  # noqa: E402
    fuzz_server as start_fuzz_server,
)

MAX_EXAMPLES = int(os.environ.get("MRIS_API_FUZZ_EXAMPLES", "100"))
SEED = int(os.environ.get("MRIS_API_FUZZ_SEED", "20240611"))
FAILURE_FILES = sorted(FAILURES.glob("*.json"))
DOCUMENT = openapi_document()
schema = load_schema(DOCUMENT, MAX_EXAMPLES, SEED)
CHOICES = random.Random(SEED)  # which bad token, which cases get the phantom's keypoints
STATS = Stats()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with start_fuzz_server(tmp_path_factory.mktemp("api-fuzz")) as server:
        yield server


def test_the_fuzzers_public_routes_are_the_documents_routes_without_security():
    public = {
        path
        for path, operations in DOCUMENT["paths"].items()
        if not any(operation.get("security") for operation in operations.values())
    }
    assert public == UNGUARDED


def test_served_schema_is_the_tested_one(fuzz_server):
    assert httpx.get(f"{fuzz_server.url}/openapi.json", timeout=10).json() == DOCUMENT


@schema.parametrize()
def test_api_fuzz(case, fuzz_server):
    findings = run_case(case, CHOICES, STATS, base_url=fuzz_server.url)
    assert not findings, "\n".join(f"{f.kind}: {f.message}" for f in findings)
    assert fuzz_server.alive(), fuzz_server.log_tail()


def test_server_survived_the_fuzzing(fuzz_server):
    assert fuzz_server.alive(), fuzz_server.log_tail()
    print(
        f"{STATS.cases} cases, {STATS.requests} requests; statuses "
        f"{sorted(STATS.route_statuses.items())}"
    )
    if STATS.cases:  # the fuzzing ran in this session: it reached past the DICOM reader
        for route in ("/synthesize", "/retrieve"):
            assert STATS.route_statuses.get((route, 200)), (
                f"no 200 from {route}: {STATS.route_statuses}"
            )
    assert httpx.get(f"{fuzz_server.url}/readyz", timeout=5).status_code == 200
    info = httpx.get(
        f"{fuzz_server.url}/info", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    assert info.status_code == 200


@pytest.mark.parametrize("path", FAILURE_FILES, ids=[path.stem for path in FAILURE_FILES])
def test_saved_failure_stays_fixed(path, fuzz_server):
    check_replayed(replay(path, fuzz_server.url), json.loads(path.read_text()).get("expect_status"))
