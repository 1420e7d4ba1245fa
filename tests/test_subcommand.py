"""``mris.subcommand.run_mris`` and the CLI's signal handling, with real processes only: a
signal to an ``mris`` command that runs another ``mris`` command stops the child too (no child
is left running or holding a port), the parent ends as interrupted (exit 128 + signal), and a
training stopped by SIGTERM keeps its checkpoint and resumes from it.

Processes are found through ``/proc`` (Linux; psutil is not a dependency)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from bundle_factory import make_encoder_onnx, make_map_cohort, make_model_bundle
from conftest import require, write_tiny_cohort

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists() and os.environ.get("CI") != "true",
    reason="finds processes through /proc (Linux)",
)


# ------------------------------------------------------------------------------ processes
def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_until(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    process: subprocess.Popen,
    log: Path,
) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(
                f"{what}: the command ended first (exit "
                f"{process.returncode}):\n{log.read_text()[-4000:]}"
            )
        time.sleep(0.05)
    pytest.fail(f"{what}: not within {timeout_s:g} s:\n{log.read_text()[-4000:]}")


def _default_signals() -> None:
    """As from a terminal: a runner that starts the tests in the background (``cmd &`` in a
    non-interactive shell) hands SIGINT down ignored, and mris keeps an ignored signal ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _mris(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """``mris ARGS`` in its own session (so a test can signal its whole process group as a
    terminal's Ctrl-C does) with stdout and stderr in ``log``."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "mris.cli", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200", **env},
            start_new_session=True,
            preexec_fn=_default_signals,
        )


def _stop(process: subprocess.Popen) -> None:
    """Clean-up after a failed assertion: nothing of a test outlives it."""
    if process.poll() is None:
        for pid in _descendants(process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.kill()
        process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:port (TIME_WAIT leftovers of closed connections allowed)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
    return True


# ------------------------------------------------------------------- mris demo --serve
@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory) -> Path:
    """A demo workdir whose cohort, model and index exist, so ``mris demo --prepare-only --serve``
    goes straight to ``mris serve`` (tiny real bundles, no training)."""
    from mris.index.build import build_index_bundle

    workdir = tmp_path_factory.mktemp("demo")
    model = make_model_bundle(workdir / "model", encoder_px=32)
    manifest = make_map_cohort(workdir / "cohort", 8, seed=3)
    build_index_bundle(
        model, manifest, workdir / "index", variant="separate", publish=True, threads=1
    )
    return workdir


@pytest.mark.parametrize("how", ["sigterm-to-parent", "ctrl-c-to-group"])
def test_a_signal_to_demo_serve_stops_its_server(demo_workdir, tmp_path, how):
    port = _free_port()
    log = tmp_path / "demo.log"
    demo = _mris(
        ["demo", "--workdir", str(demo_workdir), "--prepare-only", "--serve", "--port", str(port)],
        log,
        MRIS_INTRA_OP_THREADS="1",
        MRIS_DECODE_WORKERS="1",
        MRIS_LOG_LEVEL="INFO",
    )
    try:

        def serving() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        _wait_until(serving, 60, "mris serve under mris demo answering /healthz", demo, log)
        below = _descendants(demo.pid)
        assert any("mris.cli serve" in _cmdline(pid) for pid in below), [
            _cmdline(pid) for pid in below
        ]

        started = time.monotonic()
        if how == "sigterm-to-parent":  # kill PID, docker stop: only the parent gets it
            demo.send_signal(signal.SIGTERM)
        else:  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
            os.killpg(demo.pid, signal.SIGINT)
        returncode = demo.wait(timeout=30)
        elapsed_s = time.monotonic() - started
    finally:
        _stop(demo)

    output = log.read_text()
    expected = signal.SIGTERM if how == "sigterm-to-parent" else signal.SIGINT
    assert returncode == 128 + expected, output[-3000:]
    assert elapsed_s < 15, f"took {elapsed_s:.1f} s to stop"
    assert f"interrupted ({expected.name})" in output
    assert "Traceback" not in output, output[-3000:]
    # the graceful shutdown ran in full (a second SIGINT would have made uvicorn skip it)
    assert "Application shutdown complete" in output, output[-3000:]
    deadline = time.monotonic() + 5
    while any(_running(pid) for pid in below) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in below if _running(pid)], "a child of mris demo outlived it"
    assert _port_free(port)


# ------------------------------------------------- a training stopped by SIGTERM resumes
def _separate_only_bundle(root: Path, encoder_px: int) -> Path:
    """A real tiny bundle with only the separate variant, so ``mris evaluate --methods mris-c``
    has to train the combined encoders (``mris train`` as its child)."""
    from mris.constants import PREPROCESSING_VERSION, PreprocessConfig
    from mris.model_bundle import EncoderPair, ModelCard, VariantCard, write_model_card

    square = (encoder_px, encoder_px)
    regions = {}
    for index, region in enumerate(("fc", "tc")):
        names = (f"separate-{region}-radiograph.onnx", f"separate-{region}-thickness.onnx")
        for offset, name in enumerate(names):
            make_encoder_onnx(root / name, square, 2 * index + offset)
        regions[region] = EncoderPair(
            radiograph=names[0],
            thickness=names[1],
            radiograph_input_px=square,
            thickness_input_px=square,
        )
    write_model_card(
        root,
        ModelCard(
            created=datetime.now(timezone.utc).isoformat(),
            preprocess=PreprocessConfig(encoder_px=encoder_px).to_dict(),
            preprocessing_version=PREPROCESSING_VERSION,
            variants={"separate": VariantCard(regions=regions)},
            training={"note": "tests/test_subcommand.py"},
        ),
    )
    return root


def test_sigterm_to_evaluate_stops_its_training_which_then_resumes(tmp_path):
    require("torch")
    epochs = 3
    manifest = write_tiny_cohort(tmp_path / "cohort", subjects=12)
    model = _separate_only_bundle(
        tmp_path / "model", encoder_px=64
    )  # the quick profile's input size
    out = tmp_path / "evaluation"
    trained = out / "work" / "model-combined"
    region_dir = trained.with_name("model-combined.training") / "combined-combined"
    log = tmp_path / "evaluate.log"
    evaluate = _mris(
        [
            "evaluate",
            "--manifest",
            str(manifest),
            "--model",
            str(model),
            "--index",
            str(tmp_path / "none"),
            "--out",
            str(out),
            "--methods",
            "mris-c",
            "--epochs",
            str(epochs),
            "--threads",
            "1",
            "--quiet",
        ],
        log,
    )
    try:

        def training_child() -> int | None:
            return next(
                (pid for pid in _descendants(evaluate.pid) if "mris.cli train" in _cmdline(pid)),
                None,
            )

        child = _wait_until(
            training_child, 60, "mris train started by mris evaluate", evaluate, log
        )
        # log.json is written right after last.pt at the end of an epoch
        _wait_until(
            lambda: (region_dir / "log.json").is_file(), 120, "the first epoch", evaluate, log
        )
        below = _descendants(evaluate.pid)
        evaluate.send_signal(signal.SIGTERM)
        returncode = evaluate.wait(timeout=40)
    finally:
        _stop(evaluate)

    output = log.read_text()
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    assert not _running(child) and not [pid for pid in below if _running(pid)], (
        "mris train outlived mris evaluate"
    )
    assert "Traceback" not in output, output[-3000:]
    assert output.count("interrupted (SIGTERM)") == 2, output[
        -3000:
    ]  # the child's line and the parent's
    held = re.search(
        r"combined-combined: interrupted; \S+ holds epoch (\d+): rerun with --resume", output
    )
    assert held, output[-3000:]
    held_epoch = int(held[1])
    assert 1 <= held_epoch < epochs  # stopped during the training, after a checkpoint
    assert not (trained / "card.json").exists()

    # the same command evaluate ran, with --resume instead of --force
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "mris.cli",
            "train",
            "--manifest",
            str(manifest),
            "--out",
            str(trained),
            "--variant",
            "combined",
            "--no-localiser",
            "--profile",
            "quick",
            "--seed",
            "0",
            "--epochs",
            str(epochs),
            "--threads",
            "1",
            "--resume",
            "--quiet",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (
        f"combined-combined: resumed at epoch {held_epoch} of {epochs}"
        in resumed.stdout + resumed.stderr
    )
    history = json.loads((region_dir / "log.json").read_text())
    assert [record["epoch"] for record in history] == list(range(1, epochs + 1))
    assert (trained / "card.json").is_file()
