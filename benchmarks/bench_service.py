"""Service benchmark: /synthesize over HTTP against the in-process compute floor, throughput
with concurrent clients against the in-process pipeline's best, and a bounded load run with an
index rebuild + reload in the middle. Ratios are measured in one run, on one machine.

    python benchmarks/bench_service.py --workdir mris-demo [--requests 60] [--clients 16]

Needs a finished ``mris demo --prepare-only`` (cohort, model, published index) in WORKDIR. The
server listens on 127.0.0.1 only; every loop is bounded in requests and time.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mris-demo"))
    parser.add_argument("--requests", type=int, default=60, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--keypoints", action="store_true", help="send the true centres (skip the localiser)"
    )
    args = parser.parse_args()

    from mris.manifest import read_manifest
    from mris.pipeline import Pipeline, RequestOptions

    manifest = read_manifest(args.workdir / "cohort" / "manifest.csv")
    test_rows = manifest.select(["test"])
    paths = sorted({row.radiograph_path for row in test_rows})[:16]
    files = [manifest.resolve_path(p).read_bytes() for p in paths]
    model, index_root = args.workdir / "model", args.workdir / "index"

    # ---------------------------------------------------------------- in-process floor
    pipeline = Pipeline.load(model, index_root, variant="separate")
    options = RequestOptions(k=20)
    for data in files[:2]:
        pipeline.run(data, options)
    floor = []
    for i in range(args.requests):
        started = time.perf_counter()
        pipeline.run(files[i % len(files)], options)
        floor.append(time.perf_counter() - started)
    # best in-process throughput: prepare in 2 threads, search in batches of 16 ROIs
    started = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        prepared = list(
            pool.map(
                lambda i: pipeline.prepare(files[i % len(files)], options), range(args.requests)
            )
        )
    rois = [roi.image for p in prepared for roi in p.rois]
    hits = []
    for start in range(0, len(rois), 16):
        hits.extend(pipeline.search(rois[start : start + 16], 20))
    with ThreadPoolExecutor(2) as pool:
        list(
            pool.map(
                lambda j: pipeline.assemble(prepared[j], hits[2 * j : 2 * j + 2], 20),
                range(len(prepared)),
            )
        )
    inproc_rps = args.requests / (time.perf_counter() - started)

    # ---------------------------------------------------------------- the server (own process,
    # as deployed: clients in this process must not share the server's interpreter lock)
    port = _free_port()
    env = {**os.environ, "MRIS_LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mris.cli",
            "serve",
            "--model",
            str(model),
            "--index-root",
            str(index_root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)

    def post(client: httpx.Client, i: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = client.post(
            f"{url}/synthesize",
            content=files[i % len(files)],
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        return response.status_code, time.perf_counter() - started

    with httpx.Client() as client:
        for i in range(2):
            post(client, i)
        http = [post(client, i)[1] for i in range(args.requests)]

    def burst(n: int, clients: int) -> tuple[list[int], float]:
        started = time.perf_counter()
        with (
            ThreadPoolExecutor(clients) as pool,
            httpx.Client(limits=httpx.Limits(max_connections=clients)) as client,
        ):
            results = list(pool.map(lambda i: post(client, i), range(n)))
        return [status for status, _ in results], time.perf_counter() - started

    statuses, seconds = burst(args.requests, args.clients)
    http_rps = args.requests / seconds
    one_statuses, one_seconds = burst(args.requests // 2, 1)

    # ---------------------------------------------------------------- load + rebuild + reload
    from mris.index.build import build_index_bundle

    reload_status: list[int] = []

    def rebuild_and_reload() -> None:
        time.sleep(1.0)
        build_index_bundle(
            model,
            args.workdir / "cohort" / "manifest.csv",
            index_root,
            variant="separate",
            publish=True,
            threads=1,
        )
        reload_status.append(httpx.post(f"{url}/admin/reload", timeout=60).status_code)

    side = threading.Thread(target=rebuild_and_reload)
    side.start()
    load_statuses, load_seconds = burst(max(args.requests * 2, 100), 8)
    side.join(timeout=300)
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)

    cpu = os.cpu_count()
    print(
        f"machine: {cpu} cores; requests per measurement: {args.requests}; radiographs: "
        f"{len(files)} test DICOMs"
    )
    print(
        f"in-process floor  p50 {statistics.median(floor) * 1000:7.1f} ms  p95 "
        f"{_percentile(floor, 95) * 1000:7.1f} ms"
    )
    print(
        f"HTTP /synthesize  p50 {statistics.median(http) * 1000:7.1f} ms  p95 "
        f"{_percentile(http, 95) * 1000:7.1f} ms"
        f"   ratio p50 {statistics.median(http) / statistics.median(floor):.2f}x (goal <= 1.3x)"
    )
    print(
        f"throughput: in-process best {inproc_rps:.1f} req/s; HTTP with {args.clients} "
        f"clients {http_rps:.1f} req/s"
        f" = {http_rps / inproc_rps:.2f}x (goal >= 0.85x on CPU); 1 client "
        f"{args.requests // 2 / one_seconds:.1f} req/s;"
        f" failures {sum(s != 200 for s in statuses + one_statuses)}"
    )
    print(
        f"load with rebuild + reload: {len(load_statuses)} requests in {load_seconds:.1f} s, "
        "reload status "
        f"{reload_status}, failed requests {sum(s != 200 for s in load_statuses)} (goal 0)"
    )


if __name__ == "__main__":
    main()
