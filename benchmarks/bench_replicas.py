"""Serving replicas: N ``mris serve`` replicas behind nginx, configured by the same
docker/nginx.conf as the compose ``replicas`` profile, against plain ``mris serve``, for the
same DICOM. Ratios are measured in one run, on one machine.

    python benchmarks/bench_replicas.py --workdir mris-demo [--replicas 2] [--requests 40]

Needs a finished ``mris demo --prepare-only`` in WORKDIR (it is only read) and an ``nginx``
binary (Debian: ``apt-get install nginx``). Five paths to the same radiograph:

- plain: one ``mris serve`` with its defaults (ONNX Runtime on every core);
- nginx -> plain: the same server behind the proxy, so the difference is the proxy's hop;
- one server with ``MRIS_INTRA_OP_THREADS`` = cores / N, the replicas' setting (so N replicas
  together use the cores once, not N times), alone and behind nginx;
- nginx -> N such servers: the replica path; against the one above, N processes instead of
  one behind the same proxy.

Single-client latency is measured interleaved (one request to each path in turn, so a busy
neighbour on a shared machine slows all paths alike; 0.1 s apart, ``bench_service.SETTLE_S``);
throughput with ``--clients`` concurrent clients (one asyncio loop of bench_service's bare
HTTP/1.1 client) in rounds, every other one in reverse order. Every server and nginx listens
on 127.0.0.1 and is stopped at the end.

``local_nginx_conf`` and ``Nginx`` are also what tests/test_replicas.py runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_service import (  # noqa: E402
    SETTLE_S,
    Connection,
    Neighbours,
    _free_port,
    _percentile,
    burst,
    tree_cpu_s,
)
from serve_process import ServeProcess  # noqa: E402  (tests/serve_process.py)

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "docker" / "nginx.conf"
REWRITTEN = "# rewritten"


def local_nginx_conf(
    upstreams: Sequence[str], listen: str, workdir: Path, template: str | None = None
) -> str:
    """docker/nginx.conf (or ``template``) for an nginx on this machine. Only the lines marked
    ``# rewritten`` change: the upstream's server line becomes one line per ``host:port`` in
    ``upstreams`` with the same parameters (less ``resolve``: these are addresses, not Docker DNS
    names), ``listen`` takes ``listen``, and the pid file, logs and temporary files go to
    ``workdir``. A marked line of any other directive, or a directive missing, raises."""
    text = NGINX_CONF.read_text() if template is None else template
    seen: set[str] = set()
    out: list[str] = []
    for line in text.splitlines():
        if not line.rstrip().endswith(REWRITTEN):
            out.append(line)
            continue
        indent = line[: len(line) - len(line.lstrip())]
        words = line.split("#", 1)[0].strip().rstrip(";").split()
        directive, arguments = words[0], words[1:]
        seen.add(directive)
        if directive == "server":
            parameters = [p for p in arguments[1:] if p != "resolve"]
            out.extend(f"{indent}server {' '.join([u, *parameters])};" for u in upstreams)
        elif directive == "listen":
            out.append(f"{indent}listen {listen};")
        elif directive == "pid":
            out.append(f"{indent}pid {workdir / 'nginx.pid'};")
        elif directive in ("error_log", "access_log"):
            target = workdir / f"{directive.split('_')[0]}.log"
            out.append(f"{indent}{directive} {' '.join([str(target), *arguments[1:]])};")
        elif directive.endswith("_temp_path"):
            out.append(f"{indent}{directive} {workdir / directive.removesuffix('_path')};")
        else:
            raise ValueError(f"nginx.conf: no rule to rewrite {directive!r}: {line.strip()}")
    missing = {"server", "listen", "pid", "error_log", "access_log"} - seen
    if missing:
        raise ValueError(f"nginx.conf: no line marked {REWRITTEN!r} for {sorted(missing)}")
    return "\n".join(out) + "\n"


class Nginx:
    """nginx in the foreground with ``local_nginx_conf(upstreams, 127.0.0.1:<free port>)``, its
    files in a fresh temporary folder."""

    def __init__(self, binary: str, upstreams: Sequence[str]) -> None:
        self.binary = binary
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="mris-nginx-"))
        # nginx's workers drop root (to nobody): they must reach their temporary folders
        self.workdir.chmod(0o755)
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(local_nginx_conf(upstreams, f"127.0.0.1:{self.port}", self.workdir))
        self.process: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        return [
            self.binary,
            "-p",
            f"{self.workdir}/",
            "-e",
            str(self.workdir / "error.log"),
            "-c",
            str(self.conf),
            "-g",
            "daemon off;",  # as the official image runs it
            *extra,
        ]

    def test(self) -> subprocess.CompletedProcess:
        """``nginx -t``: the configuration's syntax, and that its files can be opened."""
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, timeout_s: float = 20.0) -> Nginx:
        """Start and wait until nginx answers HTTP (``/healthz``, with whatever status: its
        upstreams may be down on purpose)."""
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not answer within {timeout_s:.0f} s:\n{self.log()}")

    def log(self) -> str:
        path = self.workdir / "error.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: fast shutdown, workers included
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _default_file(workdir: Path) -> Path:
    from mris.manifest import read_manifest

    manifest = read_manifest(workdir / "cohort" / "manifest.csv")
    paths = sorted({row.radiograph_path for row in manifest.select(["test"])})
    return manifest.resolve_path(paths[0])


def main() -> None:
    import shutil

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("mris-demo"))
    parser.add_argument("--file", type=Path, help="the DICOM (default: the first test one)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40, help="requests per measurement")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=4, help="throughput rounds (every path once, in turn)"
    )
    parser.add_argument("--nginx", default=shutil.which("nginx"), help="the nginx binary")
    args = parser.parse_args()
    if not args.nginx:
        parser.error("no nginx binary (apt-get install nginx, or --nginx PATH)")

    path = args.file or _default_file(args.workdir)
    body = path.read_bytes()
    model, index_root = args.workdir / "model", args.workdir / "index"
    cores = os.cpu_count() or 1
    threads = max(1, cores // args.replicas)

    servers: list[ServeProcess] = []
    proxies: list[Nginx] = []
    try:
        tuned_env = {"MRIS_INTRA_OP_THREADS": str(threads)}
        plain = ServeProcess(model, index_root, {})
        tuned = ServeProcess(model, index_root, tuned_env)
        replicas = [ServeProcess(model, index_root, tuned_env) for _ in range(args.replicas)]
        servers.extend([plain, tuned, *replicas])
        for server in servers:
            server.start(timeout_s=180)
        for upstreams in ([plain], [tuned], replicas):
            addresses = [server.url.removeprefix("http://") for server in upstreams]
            proxies.append(Nginx(args.nginx, addresses).start())
        # name -> (url, the path it is compared with beside plain)
        plain_name = "plain mris serve"
        tuned_name = f"1 server, {threads} thread(s)"
        compared = {
            plain_name: (plain.url, plain_name),
            "nginx -> plain": (proxies[0].url, plain_name),
            tuned_name: (tuned.url, plain_name),
            f"nginx -> {tuned_name}": (proxies[1].url, tuned_name),
            f"nginx -> {args.replicas} servers, {threads} thread(s)": (
                proxies[2].url,
                f"nginx -> {tuned_name}",
            ),
        }
        paths = {name: url for name, (url, _) in compared.items()}

        for url in paths.values():  # warm-up: every replica's first requests, connections
            burst(url, [body], 2 * args.replicas + 2, args.replicas)
        neighbours = Neighbours()

        # single client, interleaved
        latencies: dict[str, list[float]] = {name: [] for name in paths}
        failures = 0
        connections = {name: Connection(url) for name, url in paths.items()}
        try:
            for _ in range(args.requests):
                for name, connection in connections.items():
                    time.sleep(SETTLE_S)  # the previous request's spinning threads are done
                    started = time.perf_counter()
                    status, _ = connection.post("/synthesize", body)
                    latencies[name].append(time.perf_counter() - started)
                    failures += status != 200
        finally:
            for connection in connections.values():
                connection.close()

        # concurrent clients: rounds of every path in turn, every other one in reverse order;
        # nginx's own CPU time beside
        done = {name: [0, 0.0] for name in paths}
        proxy_cpu = {name: 0.0 for name in paths}
        proxy_of = {proxy.url: proxy for proxy in proxies}
        for round_number in range(args.rounds):
            for name in list(paths)[:: -1 if round_number % 2 else 1]:
                proxy = proxy_of.get(paths[name])
                time.sleep(SETTLE_S)
                cpu_before = tree_cpu_s(proxy.process.pid) if proxy else 0.0
                result = burst(paths[name], [body], args.requests, args.clients)
                if proxy:
                    proxy_cpu[name] += tree_cpu_s(proxy.process.pid) - cpu_before
                done[name][0] += len(result.statuses)
                done[name][1] += result.seconds
                failures += result.failures
        others_cores = neighbours.cores()
    finally:
        for proxy in proxies:
            proxy.stop()
        for server in servers:
            server.stop()

    p50 = {name: statistics.median(values) for name, values in latencies.items()}
    rps = {name: count / seconds for name, (count, seconds) in done.items()}

    def ratios(values: dict[str, float], name: str) -> str:
        other = compared[name][1]
        text = f"{values[name] / values[plain_name]:.2f}x plain"
        return text + (
            f", {values[name] / values[other]:.2f}x {other}" if other != plain_name else ""
        )

    print(
        f"machine: {cores} cores; other processes kept {others_cores:.2f} cores busy meanwhile;"
        f" file {path.name} ({len(body) / 1024:.0f} KiB); failures {failures}"
    )
    print(f"single client, {args.requests} requests per path, interleaved:")
    for name, values in latencies.items():
        print(
            f"  {name:34s} p50 {p50[name] * 1000:6.1f} ms  p95 "
            f"{_percentile(values, 95) * 1000:6.1f} ms   p50 {ratios(p50, name)}"
        )
    print(f"{args.clients} concurrent clients, {args.rounds} x {args.requests} requests per path:")
    for name in paths:
        cpu = proxy_cpu[name] / done[name][0] * 1000
        nginx_cpu = f"; nginx CPU {cpu:.2f} ms per request" if cpu else ""
        print(f"  {name:34s} {rps[name]:6.1f} req/s   {ratios(rps, name)}{nginx_cpu}")


if __name__ == "__main__":
    main()
