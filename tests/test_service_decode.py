"""Hostile uploads against a real ``mris serve`` process (issue 12, item 1): the 0-line JPEG-LS
file is refused, the probes answer while decodes run, a decode past its deadline costs only its
own request, and SIGTERM stops the server within seconds whatever is in flight."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import knee_phantom, make_dicom_bytes
from pydicom import uid
from serve_process import ServeProcess, alive, descendants, tiny_bundle

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from mutations import PLANTED, hostile_files

TOKEN = "decode-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    model, index = tiny_bundle(tmp_path_factory.mktemp("decode"))
    return {"model": model, "index": index}


@pytest.fixture(scope="module")
def slow_file() -> bytes:
    """A legitimate upload that takes a while to decode: 2048 x 2048 px of 12-bit noise as
    JPEG 2000 lossless (about 1 s of openjpeg here)."""
    noise = np.random.default_rng(1).integers(0, 4096, size=(2048, 2048), dtype=np.uint16)
    return make_dicom_bytes(noise, uid.JPEG2000Lossless, bits_stored=12, imager_spacing=(0.1, 0.1))


def _post(url: str, data: bytes, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(
        f"{url}/synthesize",
        params={"keypoints": '{"right": [38.4, 48.0], "left": [89.6, 48.0]}'},
        content=data,
        headers={**AUTH, "Content-Type": "application/dicom"},
        timeout=timeout,
    )


def _is_problem(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["detail"]
    assert not any(secret in response.text for secret in PLANTED)


def _probe_while(url: str, busy: threading.Event, latencies: list[float]) -> None:
    while busy.is_set():
        started = time.monotonic()
        response = httpx.get(f"{url}/healthz", timeout=10)
        latencies.append(time.monotonic() - started)
        assert response.status_code == 200
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        time.sleep(0.05)


def test_hostile_files_are_refused_and_probes_answer_during_decodes(bundles, slow_file):
    with ServeProcess(bundles["model"], bundles["index"], {"MRIS_API_TOKEN": TOKEN}) as server:
        for data in hostile_files().values():
            _is_problem(_post(server.url, data), 400)
        # The probes keep answering while four slow decodes occupy both decode workers.
        busy, latencies, answers = threading.Event(), [], []
        busy.set()
        prober = threading.Thread(target=_probe_while, args=(server.url, busy, latencies))
        prober.start()
        uploads = [
            threading.Thread(target=lambda: answers.append(_post(server.url, slow_file)))
            for _ in range(4)
        ]
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join()
        busy.clear()
        prober.join()
        # The big noise image has no knee at the phantom's keypoints' scale: any 2xx/4xx is fine.
        assert all(answer.status_code < 500 for answer in answers), [a.text for a in answers]
        assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
        # A normal upload still works afterwards.
        ok = _post(server.url, make_dicom_bytes(knee_phantom(), bits_stored=12))
        assert ok.status_code == 200, ok.text


def test_a_decode_past_its_deadline_costs_only_its_request(bundles, slow_file):
    env = {"MRIS_DECODE_TIMEOUT_S": "0.2", "MRIS_DECODE_WORKERS": "1"}
    with ServeProcess(bundles["model"], bundles["index"], env) as server:
        _is_problem(_post(server.url, slow_file), 503)
        ok = _post(server.url, make_dicom_bytes(knee_phantom(), bits_stored=12))
        assert ok.status_code == 200, ok.text


def test_sigterm_stops_the_server_within_seconds_during_decodes(bundles, slow_file):
    """The 0-line JPEG-LS upload among slow decodes: 400, /healthz answers, and SIGTERM then
    stops the server and its decode workers within seconds."""
    server = ServeProcess(bundles["model"], bundles["index"]).start()
    try:
        children = descendants(server.pid)
        assert children, "the decode workers are child processes"
        hostile = hostile_files()["jpeg-ls-sof55-zero-lines"]
        answers: list[httpx.Response] = []
        uploads = [threading.Thread(target=lambda: answers.append(_post(server.url, hostile)))]
        uploads += [
            threading.Thread(target=lambda: _post_quietly(server.url, slow_file)) for _ in range(5)
        ]
        for upload in uploads:
            upload.start()
            time.sleep(0.05)
        time.sleep(0.5)  # decodes in flight
        assert httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200
        uploads[0].join(timeout=10)
        _is_problem(answers[0], 400)  # the 0-line JPEG-LS upload, refused while the others decode
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        code = server.wait(15)
        elapsed = time.monotonic() - started
        assert code is not None, "mris serve was still running 15 s after SIGTERM"
        assert elapsed < 8, elapsed
        print(f"mris serve exited {elapsed:.1f} s after SIGTERM")
        deadline = time.monotonic() + 5
        while any(alive(child) for child in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(child) for child in children), "a decode worker outlived the server"
        for upload in uploads:
            upload.join(timeout=30)
    finally:
        server.stop()


def _post_quietly(url: str, data: bytes) -> None:
    try:
        _post(url, data)
    except httpx.HTTPError:
        pass  # the server went away mid-request: expected here
