"""API-level fuzzing of a real ``mris serve`` with schemathesis, and its long-run driver.

Usage (the long run; tests/test_api_fuzz.py runs a short, fixed-seed version in CI)::

    .venv/bin/python tests/fuzz/api_fuzz.py --seconds 600
    .venv/bin/python tests/fuzz/api_fuzz.py --cases 5000 --seed 7 --slow-s 2

It prints one line, e.g. ``5000 cases, 5xx=0, crashes=0, slow=0, max RSS 420 MB``, and writes
every failing request to ``tests/fuzz/failures/api/<what>-<hash>.json``; tests/test_api_fuzz.py
replays each file there as a regression test (commit the file with the fix). The exit status is
1 when anything failed.

Decisions:

- The server is the real CLI (``python -m mris.cli serve``) in a subprocess with
  ``MRIS_API_TOKEN`` set, on a free port of 127.0.0.1, over the tiny real model bundle and index
  of tests/bundle_factory.py; ``MRIS_MAX_UPLOAD_MB`` is small so 413 is reachable.
- Cases come from the service's own OpenAPI document (every route, positive and negative data).
  The DICOM (multipart ``file``, ``application/dicom`` body) is drawn from real small DICOMs
  written by tests/conftest.py ``make_dicom_bytes``, byte-level mutations of them and random
  bytes, so requests get past the DICOM reader; half the positive cases get keypoints inside the
  phantom so they also reach the ROI, the encoders, the search and the synthesis.
- Checks on every response: schemathesis's (no 5xx; status code, content type, headers and body
  as declared; negative data rejected; ignored auth; unsupported methods) except
  ``positive_data_acceptance`` (a schema-valid body need not be a DICOM, so 400/422 are right),
  plus ``problem_details``: every answer of 400 or more is application/problem+json with a
  non-empty ``detail``.
- Every case on a guarded route is sent again with a bad ``Authorization`` (none, wrong, other
  scheme, non-ASCII and UTF-8 bytes, empty); the answer must be exactly 401 problem+json.
- A failure file holds the request as sent (method, path and query, headers, body as base64), so
  the replay needs neither schemathesis nor the seed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
FAILURES = HERE / "failures" / "api"  # failures/dicom beside it is the DICOM fuzzer's
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# after the sys.path insertion above (tests/ holds serve_process)
from serve_process import ServeProcess, tiny_bundle  # noqa: E402

TOKEN = "fuzz-token-0123456789"
PHANTOM_KEYPOINTS = (
    '{"right": [38.4, 48.0], "left": [89.6, 48.0]}'  # tests/conftest.py knee_phantom
)
MAX_UPLOAD_MB = 1.0
REQUEST_TIMEOUT_S = 30.0
# Routes without a token: health, and the viewer's configuration (colour maps, no data).
UNGUARDED = {"/healthz", "/readyz", "/viewer/config"}
# Sent as latin-1 bytes by requests: "\xe9" is one byte 0xE9, the UTF-8 one two bytes C3 A9.
BAD_AUTH: dict[str, str | None] = {
    "none": None,
    "wrong": "Bearer wrong-token",
    "prefix": f"Bearer {TOKEN[:-1]}",
    "longer": f"Bearer {TOKEN}x",
    "basic": f"Basic {TOKEN}",
    "empty": "Bearer ",
    "latin-1": "Bearer \xe9",
    "utf-8": "Bearer " + "é".encode().decode("latin-1"),
    "control": "Bearer \x7f\x01",
}


# ----------------------------------------------------------------------------------- server
def fuzz_server(
    root: Path,
    token: str = TOKEN,
    max_upload_mb: float = MAX_UPLOAD_MB,
    bundle: tuple[Path, Path] | None = None,
) -> ServeProcess:
    """The real ``mris serve`` this fuzzer targets, over ``bundle`` (model, index root) or the
    tiny bundle built under ``root`` (reused when already there); ``MRIS_MAX_UPLOAD_MB`` is small
    so 413 is reachable."""
    if bundle is not None:
        model, index = bundle
    elif (root / "index" / "current").exists():
        model, index = root / "model", root / "index"
    else:
        model, index = tiny_bundle(root)
    env = {
        "MRIS_API_TOKEN": token,
        "MRIS_MAX_UPLOAD_MB": str(max_upload_mb),
        "MRIS_INTRA_OP_THREADS": "1",
        "MRIS_WORKER_THREADS": "2",
        "MRIS_REQUEST_TIMEOUT_S": "20",
    }
    return ServeProcess(model, index, env, log_path=root / "serve.log")


# ------------------------------------------------------------------------------- generation
def dicom_samples() -> list[bytes]:
    """Small real DICOMs: the 128 x 96 knee phantom in a few encodings and spacings, and more."""
    import numpy as np
    from conftest import knee_phantom, make_dicom_bytes
    from pydicom import uid

    phantom = knee_phantom()
    return [
        make_dicom_bytes(phantom, imager_spacing=(0.2, 0.2)),
        make_dicom_bytes(
            phantom, uid.ImplicitVRLittleEndian, imager_spacing=None, pixel_spacing=(0.15, 0.15)
        ),
        make_dicom_bytes(phantom, uid.ExplicitVRBigEndian, imager_spacing=(0.3, 0.3)),
        make_dicom_bytes(phantom, uid.RLELossless, imager_spacing=(0.2, 0.2)),
        make_dicom_bytes(
            phantom, imager_spacing=None
        ),  # no spacing: 400 unless spacing_mm is given
        make_dicom_bytes(phantom, photometric="MONOCHROME1", imager_spacing=(0.2, 0.2)),
        make_dicom_bytes((phantom >> 4).astype(np.uint8), imager_spacing=(0.2, 0.2)),
        make_dicom_bytes(knee_phantom(rows=40, cols=48, seed=2), imager_spacing=(1.0, 1.0)),
    ]


def dicom_strategy() -> Any:
    """Real DICOMs, byte-level mutations of them (truncation, overwrite, insertion) and noise."""
    from hypothesis import strategies as st

    samples = st.sampled_from(dicom_samples())

    def mutate(args: tuple[bytes, str, int, bytes]) -> bytes:
        data, how, position, chunk = args
        at = position % (len(data) + 1)
        if how == "truncate":
            return data[:at]
        if how == "overwrite":
            return data[:at] + chunk + data[at + len(chunk) :]
        return data[:at] + chunk + data[at:]

    mutated = st.tuples(
        samples,
        st.sampled_from(["truncate", "overwrite", "insert"]),
        st.integers(0, 1 << 16),
        st.binary(min_size=1, max_size=64),
    ).map(mutate)
    return st.one_of(samples, mutated, st.binary(max_size=2048))


_REGISTERED = False


def register_dicom_media_type() -> None:
    """Let schemathesis draw DICOM bodies and ``file`` parts (declared application/dicom)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import schemathesis

    schemathesis.openapi.media_type(
        "application/dicom", dicom_strategy(), aliases=["application/octet-stream"]
    )
    _REGISTERED = True


def schema_config(max_examples: int, seed: int | None) -> Any:
    import schemathesis

    data: dict[str, Any] = {
        "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
        "checks": {"positive_data_acceptance": {"enabled": False}},
        "phases": {"coverage": {"generate-duplicate-query-parameters": True}},
        "request-timeout": REQUEST_TIMEOUT_S,
    }
    if seed is not None:
        data["seed"] = seed
    return schemathesis.Config.from_dict(data)


def openapi_document() -> dict[str, Any]:
    """The service's OpenAPI document, from the app itself (no bundle, no server needed)."""
    from mris.service.app import create_app
    from mris.service.config import Settings

    return create_app(Settings(api_token=TOKEN)).openapi()


def load_schema(
    source: str | dict[str, Any], max_examples: int = 10, seed: int | None = None
) -> Any:
    """A schemathesis schema from a server's base URL (its /openapi.json) or from a document."""
    import schemathesis

    register_dicom_media_type()
    config = schema_config(max_examples, seed)
    if isinstance(source, dict):
        return schemathesis.openapi.from_dict(source, config=config)
    return schemathesis.openapi.from_url(f"{source}/openapi.json", config=config)


# ----------------------------------------------------------------------------------- checks
def problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every answer of 400 or more is application/problem+json with a non-empty detail."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/problem+json"), (
        f"{response.status_code} answered as {content_type or 'no content type'}, not problem+json"
    )
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} problem+json body is not JSON") from None
    assert (
        isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"].strip()
    ), f"{response.status_code} problem+json without a detail: {response.content[:200]!r}"
    assert body.get("status") == response.status_code, "problem status differs from the HTTP status"
    return True


@dataclass
class Finding:
    """One failed expectation and the request that showed it."""

    kind: str  # "5xx", "crash", "check" or "auth"
    message: str
    request: dict[str, Any]


@dataclass
class Stats:
    cases: int = 0
    requests: int = 0
    server_errors: int = 0
    crashes: int = 0
    slow: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    route_statuses: dict[tuple[str, int], int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    peak_rss_mib: float = 0.0
    peak_children_mib: float = 0.0
    rss_series_mb: list[float] = field(default_factory=list)  # start, every 1,000 cases, end
    slowest_s: float = 0.0


def _request_record(method: str, url: str, headers: Any, body: Any) -> dict[str, Any]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if isinstance(body, str):
        body = body.encode("utf-8")
    names = {
        "user-agent",
        "accept-encoding",
        "accept",
        "connection",
        "content-length",
        "x-schemathesis-testcaseid",
    }
    return {
        "method": method,
        "target": target,
        "headers": [
            [k, (v if isinstance(v, str) else bytes(v).decode("latin-1")).replace(TOKEN, "{token}")]
            for k, v in dict(headers).items()
            if k.lower() not in names
        ],
        "body_b64": base64.b64encode(body or b"").decode("ascii"),
    }


def _with_phantom_keypoints(case: Any, rng: random.Random) -> None:
    """Half the positive cases of the upload routes get keypoints inside the phantom, as a query
    parameter (a form field of the same name still wins). Not in the body: schemathesis would
    re-validate an edited multipart body and count its ``bytes`` file as schema-violating."""
    meta = getattr(case, "meta", None)
    positive = meta is not None and getattr(meta.generation.mode, "is_positive", False)
    if case.path not in ("/synthesize", "/retrieve") or not positive or rng.random() < 0.5:
        return
    case.query = {**(case.query or {}), "keypoints": PHANTOM_KEYPOINTS}


def _send(
    case: Any,
    base_url: str | None,
    headers: dict[str, str] | None,
    session: Any,
    stats: Stats,
    expect_status: int | None,
    slow_s: float,
    label: str,
) -> list[Finding]:
    import requests
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    stats.requests += 1
    try:
        response = case.call(base_url, session, headers, timeout=REQUEST_TIMEOUT_S)
    except requests.RequestException as exc:
        kwargs = case.as_transport_kwargs(base_url=base_url, headers=headers)
        names = ("method", "url", "headers", "params", "data", "files", "json", "cookies")
        unsent = requests.Request(**{k: kwargs[k] for k in names if k in kwargs}).prepare()
        record = _request_record(unsent.method, unsent.url, unsent.headers, unsent.body)
        stats.crashes += 1
        return [Finding("crash", f"{label}: no answer ({type(exc).__name__})", record)]
    prepared = response.request
    record = _request_record(prepared.method, prepared.url, prepared.headers, prepared.body)
    stats.statuses[response.status_code] = stats.statuses.get(response.status_code, 0) + 1
    route = (case.path, response.status_code)
    stats.route_statuses[route] = stats.route_statuses.get(route, 0) + 1
    stats.slowest_s = max(stats.slowest_s, response.elapsed)
    if response.elapsed > slow_s:
        stats.slow += 1
    findings: list[Finding] = []
    if response.status_code >= 500:
        stats.server_errors += 1
        findings.append(
            Finding("5xx", f"{label}: {response.status_code} {response.content[:300]!r}", record)
        )
    try:
        case.validate_response(
            response,
            headers=headers,
            excluded_checks=[positive_data_acceptance],
            additional_checks=[problem_details],
            transport_kwargs={"base_url": base_url} if base_url else None,
        )
    except FailureGroup as group:
        for failure in group.exceptions:
            findings.append(
                Finding("check", f"{label}: {failure.title}: {failure.message}"[:2000], record)
            )
    except AssertionError as exc:
        findings.append(Finding("check", f"{label}: {exc}"[:2000], record))
    if expect_status is not None and response.status_code != expect_status:
        findings.append(
            Finding(
                "auth", f"{label}: expected {expect_status}, got {response.status_code}", record
            )
        )
    return findings


def run_case(
    case: Any,
    rng: random.Random,
    stats: Stats,
    session: Any = None,
    slow_s: float = 5.0,
    base_url: str | None = None,
) -> list[Finding]:
    """Send ``case`` with the right token and, on a guarded route, once more with a bad
    ``Authorization`` chosen from ``BAD_AUTH`` by ``rng``; return what failed (nothing when all
    is fine). ``rng`` also picks the positive cases that get the phantom's keypoints."""
    stats.cases += 1
    _with_phantom_keypoints(case, rng)
    findings = _send(
        case, base_url, {"Authorization": f"Bearer {TOKEN}"}, session, stats, None, slow_s, "token"
    )
    if case.path not in UNGUARDED and case.method.upper() == case.operation.method.upper():
        # (an unexpected method is refused by the router, 405, before any authentication)
        variant = rng.choice(sorted(BAD_AUTH))
        value = BAD_AUTH[variant]
        generated = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        original = case.headers
        case.headers = generated
        try:
            headers = None if value is None else {"Authorization": value}
            findings += _send(
                case, base_url, headers, session, stats, 401, slow_s, f"auth {variant}"
            )
        finally:
            case.headers = original
    return findings


# ------------------------------------------------------------------------------- failures
def save_finding(finding: Finding, directory: Path = FAILURES) -> Path:
    """Write the failing request as ``<kind>-<hash>.json``; the same request gives the same file."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(json.dumps(finding.request, sort_keys=True).encode()).hexdigest()[:12]
    path = directory / f"{finding.kind}-{digest}.json"
    path.write_text(json.dumps({"found": finding.message, **finding.request}, indent=1) + "\n")
    return path


def saved_body(saved: dict[str, Any]) -> bytes:
    """``body_b64``, or ``body_parts`` (``[{"b64": ..., "repeat": n}, ...]``) for big bodies."""
    if "body_parts" in saved:
        return b"".join(
            base64.b64decode(part["b64"]) * part.get("repeat", 1) for part in saved["body_parts"]
        )
    return base64.b64decode(saved.get("body_b64", ""))


def replay(path: Path, base_url: str, token: str = TOKEN) -> Any:
    """Send the saved request again (``{token}`` in a header value becomes the server's token);
    return the httpx response."""
    import httpx

    saved = json.loads(path.read_text())
    headers = [
        (name.encode("latin-1"), value.replace("{token}", token).encode("latin-1"))
        for name, value in saved["headers"]
    ]
    return httpx.request(
        saved["method"],
        base_url + saved["target"],
        headers=headers,
        content=saved_body(saved),
        timeout=REQUEST_TIMEOUT_S,
    )


def check_replayed(response: Any, expect_status: int | None = None) -> None:
    """A replayed failure must now be a non-5xx answer, a 4xx one problem+json with a detail,
    and have the file's ``expect_status`` when it names one."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:300]}"
    if response.status_code >= 400:
        assert response.headers["content-type"].startswith("application/problem+json"), (
            response.text[:300]
        )
        assert response.json()["detail"].strip()
    if expect_status is not None:
        assert response.status_code == expect_status, (
            f"{response.status_code}: {response.text[:300]}"
        )


# -------------------------------------------------------------------------------- long run
def _strategies(schema: Any) -> list[Any]:
    from schemathesis import GenerationMode

    strategies = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(generation_mode=mode))
    return strategies


def long_run(
    cases: int | None,
    seconds: float | None,
    seed: int,
    slow_s: float,
    chunk: int = 25,
    bundle: tuple[Path, Path] | None = None,
) -> Stats:
    import requests
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis import strategies as st

    stats = Stats()
    started = time.monotonic()
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="mris-api-fuzz-") as tmp:
        server = fuzz_server(Path(tmp), bundle=bundle).start()
        stats.rss_series_mb.append(server.rss_mb())
        try:
            schema = load_schema(server.url, seed=seed)
            case_strategy = st.one_of(_strategies(schema))
            session = requests.Session()

            def done() -> bool:
                return (cases is not None and stats.cases >= cases) or (
                    seconds is not None and time.monotonic() - started >= seconds
                )

            @settings(
                max_examples=chunk,
                deadline=None,
                database=None,
                derandomize=False,
                suppress_health_check=list(HealthCheck),
                phases=["generate"],
            )
            @given(case=case_strategy)
            def one(case: Any) -> None:
                if done():
                    return
                for finding in run_case(case, rng, stats, session, slow_s, server.url):
                    stats.findings.append(finding)
                    print(
                        f"  {finding.kind}: {finding.message[:300]} -> {save_finding(finding)}",
                        flush=True,
                    )
                server.sample()
                if stats.cases % 1000 == 0:
                    stats.rss_series_mb.append(server.rss_mb())
                if not server.alive():
                    server.start()  # a crash is counted by the failed request; keep fuzzing
                    session.close()

            while not done():
                hypothesis_seed(rng.getrandbits(64))(one)()
        finally:
            stats.rss_series_mb.append(server.rss_mb())
            server.stop()
    stats.peak_rss_mib = server.peak_rss_mb
    stats.peak_children_mib = server.peak_workers_mb
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=None, help="stop after this many cases")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--model", type=Path, help="model bundle (default: a tiny test bundle)")
    parser.add_argument("--index", type=Path, help="index root, with --model")
    parser.add_argument(
        "--slow-s", type=float, default=2.0, help="a request slower than this counts as slow"
    )
    args = parser.parse_args(argv)
    if args.cases is None and args.seconds is None:
        args.cases = 500
    seed = args.seed if args.seed is not None else random.SystemRandom().getrandbits(32)
    print(f"seed {seed}", flush=True)
    bundle = (args.model, args.index) if args.model else None
    stats = long_run(args.cases, args.seconds, seed, args.slow_s, bundle=bundle)
    statuses = ", ".join(f"{code}: {count}" for code, count in sorted(stats.statuses.items()))
    print(f"statuses {statuses}; {stats.requests} requests; {len(stats.findings)} findings")
    series = stats.rss_series_mb
    print(
        f"server RSS before {series[0]:.0f} MB, after {series[-1]:.0f} MB, peak "
        f"{stats.peak_rss_mib:.0f} MB; every 1,000 cases: {', '.join(f'{v:.0f}' for v in series)}"
    )
    print(
        f"{stats.cases} cases, 5xx={stats.server_errors}, crashes={stats.crashes}, "
        f"slow={stats.slow}, "
        f"max RSS {stats.peak_rss_mib:.0f} MB (decode workers {stats.peak_children_mib:.0f} MB), "
        f"slowest {stats.slowest_s:.2f} s"
    )
    return 1 if stats.findings else 0


if __name__ == "__main__":
    sys.exit(main())
