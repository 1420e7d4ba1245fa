"""A real ``mris serve`` process on 127.0.0.1 for the tests and fuzzers that must see what a
client sees: its own process (so SIGTERM, RSS and its decode workers are real), a free port,
settings from ``MRIS_*`` variables as in production; and the tiny real bundle they serve."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def tiny_bundle(root: Path, pairs: int = 24) -> tuple[Path, Path]:
    """A tiny real model bundle (tests/bundle_factory.py: ONNX encoders, no localiser, so requests
    give keypoints) and a published index of ``pairs`` tiny maps under ``root``."""
    from bundle_factory import make_map_cohort, make_model_bundle

    from mris.index.build import build_index_bundle

    model = make_model_bundle(root / "model", encoder_px=32)
    manifest = make_map_cohort(root / "cohort", pairs, seed=3)
    build_index_bundle(model, manifest, root / "index", variant="separate", publish=True, threads=1)
    return model, root / "index"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of one process in MB (``VmHWM``: its peak so far); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren...)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as handle:
                    children = [int(child) for child in handle.read().split()]
            except OSError:
                continue
            found.extend(children)
            queue.extend(children)
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ServeProcess:
    """``mris serve --model M --index-root I`` with ``env`` added to the environment."""

    def __init__(
        self,
        model: Path,
        index_root: Path,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [
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
            str(self.port),
        ]
        self.env = {**os.environ, "MRIS_LOG_LEVEL": "WARNING", **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.peak_rss_mb = 0.0
        self.peak_workers_mb = 0.0

    def start(self, timeout_s: float = 90.0) -> ServeProcess:
        """Start (or restart, on the same port) and wait until ``/readyz`` answers 200."""
        if self.log_path is not None:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
        else:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mris serve exited with {self.process.returncode} while "
                    f"starting:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"mris serve was not ready within {timeout_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:] if self.log_path else ""
        except OSError:
            return ""

    def sample(self) -> None:
        """Track the peak resident memory of the server and, apart, of its decode workers."""
        if self.alive():
            self.peak_rss_mb = max(self.peak_rss_mb, self.peak_rss_mb_now())
            self.peak_workers_mb = max(self.peak_workers_mb, self.workers_rss_mb())

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_mb(self) -> float:
        """The server's own resident memory (its decode workers are separate processes)."""
        return rss_mb(self.pid)

    def peak_rss_mb_now(self) -> float:
        """The server's peak resident memory since it started (the kernel's high-water mark)."""
        return rss_mb(self.pid, "VmHWM")

    def workers_rss_mb(self) -> float:
        return sum(rss_mb(child) for child in descendants(self.pid))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout_s: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.sample()
        children = descendants(self.pid)
        self.signal(signal.SIGTERM)
        if self.wait(15) is None:
            self.process.kill()
            self.process.wait(5)
        for child in children:
            if alive(child):
                os.kill(child, signal.SIGKILL)

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
