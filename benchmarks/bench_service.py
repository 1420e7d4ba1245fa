"""Service benchmark: /synthesize over HTTP against the in-process compute floor, throughput
with concurrent clients against the in-process pipeline's best, and a bounded load run with an
index rebuild + reload in the middle. Ratios are measured in one run, on one machine.

    python benchmarks/bench_service.py --workdir mris-demo [--requests 60] [--clients 16]
        [--rounds 3] [--no-reload] [--server-env MRIS_NAME=VALUE ...]

Needs a finished ``mris demo --prepare-only`` (cohort, model, published index) in WORKDIR; the
load run publishes a new index bundle there (``--no-reload`` skips it and leaves WORKDIR as it
is). The server listens on 127.0.0.1 only; every loop is bounded in requests and time.

Each ratio's two sides are measured in turn, not one after the other: single requests in
process and over HTTP alternate, and the throughput rounds alternate the in-process best and the
HTTP burst. On a shared machine a neighbour's load then weighs on both sides alike; the CPU time
per request (this process, the server with its decode workers) is printed as well, since it
moves less than wall-clock figures do.

The clients are one asyncio event loop in this process (``burst``: a bare HTTP/1.1 client on
kept-alive connections, the DICOM bytes read beforehand), the cheapest load generator at hand:
on a 2-core machine the clients share the cores with the server, so their CPU time is measured
and printed beside the throughput it limits.
"""

from __future__ import annotations

import argparse
import asyncio
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
from urllib.parse import urlsplit

import httpx
import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


SETTLE_S = 0.1
"""Pause before each timed single request and each throughput phase: after a run, an ONNX
Runtime session with more than one intra-op thread keeps a thread spin-waiting for about
60 ms (measured: 60 ms of CPU burnt during a 100 ms sleep after one encoder run), which would
otherwise slow the next request, in this process or another."""


class Neighbours:
    """How much CPU other processes on the machine used while a benchmark ran: all busy time
    (/proc/stat) less this process's and its descendants' (servers, nginx, decode workers).
    On a shared machine this says whether a figure was measured on an idle machine."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.busy, self.mine = self._busy_s(), tree_cpu_s(os.getpid())

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as handle:
            fields = [int(value) for value in handle.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal: all but idle and iowait
        return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    def cores(self) -> float:
        """Cores the other processes kept busy on average since this object was made."""
        busy, mine = self._busy_s() - self.busy, tree_cpu_s(os.getpid()) - self.mine
        return max(0.0, busy - mine) / (time.perf_counter() - self.started)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants (a server and its
    decode workers), from /proc; 0 where /proc is missing."""
    total, queue = 0.0, [pid]
    ticks = os.sysconf("SC_CLK_TCK")
    while queue:
        current = queue.pop()
        try:
            with open(f"/proc/{current}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    queue.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return total


class Burst:
    """What ``burst`` measured: per request status and latency (s), the wall time (s) and this
    process's CPU time (s) while it ran (the clients' cost)."""

    def __init__(self, statuses: list[int], latencies: list[float], seconds: float, cpu: float):
        self.statuses, self.latencies, self.seconds, self.cpu = statuses, latencies, seconds, cpu

    @property
    def rps(self) -> float:
        return len(self.statuses) / self.seconds

    @property
    def failures(self) -> int:
        return sum(status != 200 for status in self.statuses)

    @property
    def client_cpu_ms(self) -> float:
        return self.cpu / len(self.statuses) * 1000


# The load generator is a bare HTTP/1.1 client (keep-alive, Content-Length bodies): on a
# 2-core machine the clients share the cores with the server, and reading a 0.7 MB answer
# costs httpx about 5 ms of CPU where this costs about 1.5 ms (measured with 16 clients).


def _request(netloc: str, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {netloc}\r\nContent-Type: application/dicom\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def _status_length_close(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length and whether the server closes, from a response head."""
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.lower().split(":", 1) for line in lines[1:] if ":" in line)
    if "content-length" not in fields:
        raise RuntimeError(f"a response without Content-Length: {lines[0]}")
    close = fields.get("connection", "").strip() == "close"
    return int(lines[0].split()[1]), int(fields["content-length"]), close


class Connection:
    """One kept-alive connection for single requests (blocking)."""

    def __init__(self, url: str) -> None:
        self.parts = urlsplit(url)
        self.sock: socket.socket | None = None

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """(status, response body) of a POST of ``body`` as ``application/dicom``."""
        if self.sock is None:
            self.sock = socket.create_connection((self.parts.hostname, self.parts.port))
            self.file = self.sock.makefile("rb")
        self.sock.sendall(_request(self.parts.netloc, path, body))
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.file.readline()
            if not line:
                raise ConnectionError("the server closed the connection")
            head += line
        status, length, close = _status_length_close(head)
        answer = self.file.read(length)
        if close:
            self.close()
        return status, answer

    def close(self) -> None:
        if self.sock is not None:
            self.file.close()
            self.sock.close()
            self.sock = None


def burst(url: str, bodies: list[bytes], n: int, clients: int, path: str = "/synthesize") -> Burst:
    """``n`` POSTs of ``bodies`` (round robin, as ``application/dicom``) to ``url + path`` from
    ``clients`` concurrent kept-alive connections, in one asyncio event loop in this process."""
    parts = urlsplit(url)

    async def run() -> Burst:
        statuses: list[int] = [0] * n
        latencies: list[float] = [0.0] * n
        next_request = iter(range(n))

        async def one_client() -> None:
            reader = writer = None
            try:
                for i in next_request:  # shared: each request is taken by one client
                    started = time.perf_counter()
                    if writer is None:
                        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    writer.write(_request(parts.netloc, path, bodies[i % len(bodies)]))
                    status, length, close = _status_length_close(
                        await reader.readuntil(b"\r\n\r\n")
                    )
                    await reader.readexactly(length)
                    latencies[i], statuses[i] = time.perf_counter() - started, status
                    if close:
                        writer.close()
                        reader = writer = None
            finally:
                if writer is not None:
                    writer.close()

        cpu_started, started = time.process_time(), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(clients))), 600)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return Burst(statuses, latencies, seconds, cpu)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mris-demo"))
    parser.add_argument("--requests", type=int, default=60, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=3, help="throughput rounds (in-process, then HTTP, each)"
    )
    parser.add_argument(
        "--keypoints", action="store_true", help="send the true centres (skip the localiser)"
    )
    parser.add_argument(
        "--no-reload", action="store_true", help="skip the load run with a rebuild + reload"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MRIS_NAME=VALUE",
        help="a setting for the server (repeatable), e.g. MRIS_MAX_WAIT_MS=1",
    )
    args = parser.parse_args()

    from mris.manifest import read_manifest
    from mris.pipeline import Pipeline, RequestOptions

    manifest = read_manifest(args.workdir / "cohort" / "manifest.csv")
    test_rows = manifest.select(["test"])
    paths = sorted({row.radiograph_path for row in test_rows})[:16]
    files = [manifest.resolve_path(p).read_bytes() for p in paths]
    model, index_root = args.workdir / "model", args.workdir / "index"

    # ---------------------------------------------------------------- the server (own process,
    # as deployed: clients in this process must not share the server's interpreter lock)
    port = _free_port()
    env = {**os.environ, "MRIS_LOG_LEVEL": "WARNING"}
    env.update(item.split("=", 1) for item in args.server_env)
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

    # ---------------------------------------------------------------- the in-process pipeline
    # with the server's ONNX Runtime threads, so that the two sides differ by the HTTP path only
    from mris.service.config import Settings

    intra_op_threads = int(
        env.get("MRIS_INTRA_OP_THREADS", Settings.model_fields["intra_op_threads"].default)
    )
    pipeline = Pipeline.load(
        model, index_root, variant="separate", intra_op_threads=intra_op_threads
    )
    options = RequestOptions(k=20)
    for data in files[:2]:
        pipeline.run(data, options)

    def inprocess_best(n: int) -> tuple[float, float]:
        """Best in-process throughput: prepare in 2 threads, search in batches of 16 ROIs,
        assemble in 2 threads. (seconds, CPU seconds of this process)"""
        cpu_started, started = time.process_time(), time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            prepared = list(
                pool.map(lambda i: pipeline.prepare(files[i % len(files)], options), range(n))
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
        return time.perf_counter() - started, time.process_time() - cpu_started

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    burst(url, files, 4, 1)  # warm-up: connections, first requests
    neighbours = Neighbours()

    # One request in process, one over HTTP, in turn: on a shared machine a busy neighbour
    # slows both alike, so the ratio holds where the absolute figures move.
    floor, http = [], []
    connection = Connection(url)
    for i in range(args.requests):
        data = files[i % len(files)]
        time.sleep(SETTLE_S)
        started = time.perf_counter()
        pipeline.run(data, options)
        floor.append(time.perf_counter() - started)
        time.sleep(SETTLE_S)
        started = time.perf_counter()
        status, answer = connection.post("/synthesize", data)
        http.append(time.perf_counter() - started)
        assert status == 200, answer[:300]
    connection.close()

    # Throughput: the in-process best and HTTP with --clients clients, round after round.
    inproc_seconds = inproc_cpu = 0.0
    bursts: list[Burst] = []
    server_cpu = 0.0
    for _ in range(args.rounds):
        time.sleep(SETTLE_S)
        seconds, cpu = inprocess_best(args.requests)
        inproc_seconds += seconds
        inproc_cpu += cpu
        time.sleep(SETTLE_S)
        server_cpu_started = tree_cpu_s(server.pid)
        bursts.append(burst(url, files, args.requests, args.clients))
        server_cpu += tree_cpu_s(server.pid) - server_cpu_started
    served = args.rounds * args.requests
    inproc_rps = served / inproc_seconds
    http_seconds = sum(b.seconds for b in bursts)
    http_rps = served / http_seconds
    client_cpu_ms = sum(b.cpu for b in bursts) / served * 1000
    one = burst(url, files, args.requests // 2, 1)

    # ---------------------------------------------------------------- load + rebuild + reload
    # (it publishes a new index bundle into WORKDIR: --no-reload leaves WORKDIR as it is)
    load, reload_status = None, []
    if not args.no_reload:
        from mris.index.build import build_index_bundle

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
        load = burst(url, files, max(args.requests * 2, 100), 8)
        side.join(timeout=300)
    others_cores = neighbours.cores()
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)

    cpu = os.cpu_count()
    print(
        f"machine: {cpu} cores; requests per measurement: {args.requests}; radiographs: "
        f"{len(files)} test DICOMs; ONNX Runtime intra-op threads {intra_op_threads} (0: all "
        "cores) on both sides"
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
        f"clients {http_rps:.1f} req/s = {http_rps / inproc_rps:.2f}x (goal >= 0.85x on CPU;"
        f" {args.rounds} rounds of {args.requests}, each pair in turn: "
        + ", ".join(f"{args.requests / b.seconds:.1f}" for b in bursts)
        + f" req/s over HTTP); 1 client {one.rps:.1f} req/s;"
        f" failures {sum(b.failures for b in bursts) + one.failures}"
    )
    print(
        f"CPU per request: in-process best {inproc_cpu / served * 1000:.1f} ms "
        f"({inproc_cpu / inproc_seconds:.2f} cores busy); server with {args.clients} clients "
        f"{server_cpu / served * 1000:.1f} ms ({server_cpu / http_seconds:.2f} cores busy; its "
        f"decode workers included); clients {client_cpu_ms:.1f} ms (this process: asyncio, "
        f"bare HTTP/1.1); other processes on the machine kept {others_cores:.2f} cores busy "
        "meanwhile"
    )
    if load is not None:
        print(
            f"load with rebuild + reload: {len(load.statuses)} requests in {load.seconds:.1f} s,"
            f" reload status {reload_status}, failed requests {load.failures} (goal 0)"
        )


if __name__ == "__main__":
    main()
