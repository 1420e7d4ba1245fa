"""Docker without an engine: lint the Dockerfiles (hadolint), validate the compose file against
the compose specification, and run the exact commands the images' entrypoints run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from bundle_factory import make_map_cohort, make_model_bundle

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed (it is in the dev extra)")
    return found


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MRIS_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def test_hadolint_passes():
    result = subprocess.run(
        [_tool("hadolint"), "docker/Dockerfile", "docker/Dockerfile.gpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_follows_the_compose_specification():
    result = subprocess.run(
        [
            _tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            "docker-compose.yml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_wiring():
    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["api"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert any(volume.endswith(":ro") for volume in services["api"]["volumes"])
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["api-gpu"]["profiles"] == ["gpu"]
    assert services["api-gpu"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] == ["gpu"]
    # The PACS profile: Orthanc with DICOMweb, and the router watching it (tests/test_pacs.py
    # runs the router's entrypoint against a real Orthanc).
    orthanc, router = services["orthanc"], services["router"]
    assert orthanc["profiles"] == router["profiles"] == ["pacs"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    assert orthanc["environment"]["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert router["entrypoint"] == ["/app/docker/router.sh"]
    assert router["environment"]["MRIS_PACS_DICOMWEB_URL"] == "http://orthanc:8042/dicom-web"
    assert "orthanc" in router["depends_on"] and "init" in router["depends_on"]
    assert any(volume.endswith(":/state") for volume in router["volumes"])


def test_init_entrypoint_prepares_the_demo_then_does_nothing(tmp_path):
    env = _env(MRIS_DATA=str(tmp_path), MRIS_DEMO_SUBJECTS="24", MRIS_DEMO_SEED="3")
    first = subprocess.run(
        ["sh", "docker/init.sh", "--epochs", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (tmp_path / "model" / "card.json").is_file()
    assert (tmp_path / "index" / "current" / "card.json").is_file()
    # the served bundle is calibrated on the downstream split (docs/UNCERTAINTY.md)
    assert (tmp_path / "index" / "current" / "calibration.json").is_file()
    again = subprocess.run(
        ["sh", "docker/init.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_serve_entrypoint_serves_from_the_environment(tmp_path):
    from mris.index.build import build_index_bundle

    model = make_model_bundle(tmp_path / "model", encoder_px=32)
    manifest = make_map_cohort(tmp_path / "cohort", 8)
    build_index_bundle(model, manifest, tmp_path / "index", publish=True, threads=1)
    port = "18765"
    env = _env(
        MRIS_MODEL_DIR=str(model),
        MRIS_INDEX_ROOT=str(tmp_path / "index"),
        MRIS_HOST="127.0.0.1",
        MRIS_PORT=port,
        MRIS_INTRA_OP_THREADS="1",
    )
    process = subprocess.Popen(
        ["sh", "docker/serve.sh"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline, status = time.time() + 60, None
        while time.time() < deadline and status != 200:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code
            except httpx.HTTPError:
                time.sleep(0.2)
        assert status == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
