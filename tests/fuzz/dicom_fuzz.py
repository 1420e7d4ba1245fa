"""The DICOM-level fuzzer: mutated real DICOMs through ``read_radiograph`` and through HTTP.

Each case (``mutations.cases``) goes

1. through ``read_radiograph`` in the decode sandbox (``mris.sandbox``, so a runaway decoder is
   caught and reported instead of hanging the fuzzer): allowed outcomes are a ``Radiograph`` or
   a typed ``MrisError``; a crashed worker, a deadline overrun or any other exception is a
   finding;
2. through ``POST /synthesize`` of a real ``mris serve`` (``application/dicom``; every other case
   with keypoints): allowed outcomes are 200, or a 4xx ``application/problem+json`` with a
   ``detail``; any 5xx, a wrong media type, a missing detail or a dropped connection is a finding.

Neither may take longer than ``--slow-s`` or echo a planted patient identifier. Findings are saved
as ``tests/fuzz/failures/dicom/<case>.dcm`` with a ``.json`` beside it (what happened); the test
suite replays every file there on each run (``tests/test_fuzz_dicom.py``), so commit the file with
its fix and it stays a regression test (the API fuzzer's are under ``failures/api/``).

Long run (prints ``N cases, 5xx=0, crashes=0, slow=S, max RSS``)::

    python tests/fuzz/dicom_fuzz.py --cases 10000 --seed 1 \\
        --model mris-demo/model --index mris-demo/index     # default: a tiny test bundle
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
for path in (HERE, TESTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# after the sys.path insertion above (tests/fuzz and tests/ hold these)
from mutations import KEYPOINTS, PLANTED, cases, hostile_files, seed_files  # noqa: E402
from serve_process import ServeProcess, tiny_bundle  # noqa: E402

FAILURES = HERE / "failures" / "dicom"
TOKEN = "fuzz-token"


@dataclass
class Tally:
    """What a campaign saw: outcomes by kind, findings, the slowest answer, the server's memory."""

    outcomes: Counter = field(default_factory=Counter)
    findings: list[tuple[str, str]] = field(default_factory=list)
    cases: int = 0
    slow: int = 0
    slowest_s: float = 0.0
    rss_mb: list[float] = field(default_factory=list)
    workers_rss_mb: list[float] = field(default_factory=list)

    def line(self) -> str:
        fivexx = sum(count for key, count in self.outcomes.items() if key.startswith("http-5"))
        crashes = sum(
            count
            for key, count in self.outcomes.items()
            if key in ("read-DecoderCrashed", "read-escaped", "http-dropped")
        )
        rss = max(self.rss_mb, default=0.0)
        return (
            f"{self.cases} cases, 5xx={fivexx}, crashes={crashes}, slow={self.slow}, "
            f"max RSS {rss:.0f} MB (server; decode workers at most "
            f"{max(self.workers_rss_mb, default=0.0):.0f} MB together), slowest "
            f"{self.slowest_s:.2f} s"
        )


def _leaks(text: str) -> bool:
    return any(secret in text for secret in PLANTED)


def check_read(sandbox, name: str, data: bytes, tally: Tally, slow_s: float) -> str | None:
    """One case through ``read_radiograph`` in the sandbox; returns a finding or None."""
    from mris.errors import DecoderCrashed, DecodeTimeout, MrisError

    started = time.monotonic()
    finding = None
    try:
        sandbox.read(data)
        tally.outcomes["read-ok"] += 1
    except (DecoderCrashed, DecodeTimeout) as exc:
        tally.outcomes[f"read-{type(exc).__name__}"] += 1
        finding = f"read: {type(exc).__name__}: {exc.detail}"
    except MrisError as exc:
        tally.outcomes[f"read-{type(exc).__name__}"] += 1
        if _leaks(exc.detail):
            finding = f"read: a planted identifier in the error: {exc.detail}"
    except Exception as exc:  # noqa: BLE001 - anything else escaped the one boundary
        tally.outcomes["read-escaped"] += 1
        finding = f"read: {type(exc).__name__} escaped read_radiograph"
    elapsed = time.monotonic() - started
    tally.slowest_s = max(tally.slowest_s, elapsed)
    if elapsed > slow_s:
        tally.slow += 1
        finding = finding or f"read: slow ({elapsed:.1f} s)"
    return finding


def check_http(
    client: httpx.Client, number: int, data: bytes, tally: Tally, slow_s: float
) -> str | None:
    """One case through ``POST /synthesize``; returns a finding or None."""
    params = {"keypoints": json.dumps(KEYPOINTS)} if number % 2 == 0 else {}
    started = time.monotonic()
    try:
        response = client.post(
            "/synthesize",
            params=params,
            content=data,
            headers={"Content-Type": "application/dicom"},
        )
    except httpx.HTTPError as exc:
        tally.outcomes["http-dropped"] += 1
        return f"http: {type(exc).__name__} (connection dropped or timed out)"
    elapsed = time.monotonic() - started
    tally.slowest_s = max(tally.slowest_s, elapsed)
    status = response.status_code
    tally.outcomes[f"http-{status}"] += 1
    if elapsed > slow_s:
        tally.slow += 1
        return f"http: slow ({elapsed:.1f} s, status {status})"
    if status >= 500:
        return f"http: {status} {response.text[:300]}"
    if _leaks(response.text):
        return "http: a planted identifier in the answer"
    if status >= 400:
        if not response.headers.get("content-type", "").startswith("application/problem+json"):
            return f"http: {status} without problem+json"
        if not response.json().get("detail"):
            return f"http: {status} without a detail"
    elif status != 200:
        return f"http: unexpected status {status}"
    return None


def save_failure(name: str, data: bytes, finding: str, folder: Path = FAILURES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", name)[:120]
    path = folder / f"{stem}.dcm"
    path.write_bytes(data)
    path.with_suffix(".json").write_text(
        json.dumps({"case": name, "finding": finding}, indent=2) + "\n"
    )
    return path


def regression_files() -> dict[str, bytes]:
    """The known hostile files and every saved failure, name -> bytes."""
    files = dict(hostile_files())
    for path in sorted(FAILURES.glob("*.dcm")):
        files[path.stem] = path.read_bytes()
    return files


def campaign(
    server: ServeProcess,
    sandbox,
    seed: int,
    count: int,
    slow_s: float = 5.0,
    save: bool = True,
    progress=None,
    extra: dict[str, bytes] | None = None,
) -> Tally:
    """Run ``count`` mutated cases (plus ``extra`` files as they are) through both paths."""
    tally = Tally()
    seeds = seed_files()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    tally.rss_mb.append(server.rss_mb())
    with httpx.Client(
        base_url=server.url, headers=headers, timeout=max(60.0, 4 * slow_s)
    ) as client:
        work = list((extra or {}).items())
        for number, (name, data) in enumerate([*work, *cases(seed, count, seeds)]):
            for finding in (
                check_read(sandbox, name, data, tally, slow_s),
                check_http(client, number, data, tally, slow_s),
            ):
                if finding is not None:
                    tally.findings.append((name, finding))
                    if save:
                        save_failure(name, data, finding)
            tally.cases += 1
            if number % 25 == 0:
                tally.rss_mb.append(server.rss_mb())
                tally.workers_rss_mb.append(server.workers_rss_mb())
            if progress is not None:
                progress(tally)
    tally.rss_mb.append(server.rss_mb())
    tally.workers_rss_mb.append(server.workers_rss_mb())
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--model", type=Path, help="model bundle (default: a tiny test bundle)")
    parser.add_argument("--index", type=Path, help="index root (with --model)")
    parser.add_argument(
        "--slow-s", type=float, default=5.0, help="an answer slower than this is a finding"
    )
    args = parser.parse_args()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from mris.sandbox import DecodeSandbox

    with tempfile.TemporaryDirectory() as folder:
        model, index = (args.model, args.index) if args.model else tiny_bundle(Path(folder))
        with (
            ServeProcess(model, index, {"MRIS_API_TOKEN": TOKEN}) as server,
            DecodeSandbox() as sandbox,
        ):
            before = server.rss_mb()
            with Progress(
                TextColumn("fuzzing"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
            ) as bar:
                task = bar.add_task("cases", total=args.cases + len(regression_files()), status="")
                tally = campaign(
                    server,
                    sandbox,
                    args.seed,
                    args.cases,
                    args.slow_s,
                    extra=regression_files(),
                    progress=lambda t: bar.update(
                        task, completed=t.cases, status=f"findings {len(t.findings)}"
                    ),
                )
            after, peak = server.rss_mb(), server.peak_rss_mb_now()
    print(f"server RSS before {before:.0f} MB, after {after:.0f} MB, peak {peak:.0f} MB")
    print(
        "outcomes: " + ", ".join(f"{key} {count}" for key, count in sorted(tally.outcomes.items()))
    )
    for name, finding in tally.findings[:20]:
        print(f"FINDING {name}: {finding}")
    print(tally.line())
    return 1 if tally.findings else 0


if __name__ == "__main__":
    sys.exit(main())
