"""``mris pacs`` against a real Orthanc with its DICOMweb plugin (tests/orthanc_server.py): a
cohort radiograph in, the Secondary Capture and the SR read back over DICOMweb; the watcher
across a restart; dead letters and their retry; a PACS that is down; no identity in any log."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
import requests
from conftest import PLANTED_IDENTITY, PLANTED_SECRETS
from orthanc_server import OrthancServer, require_orthanc
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from serve_process import free_port
from typer.testing import CliRunner

from mris.cli import app as cli_app
from mris.pacs.client import InstanceRef, PacsClient, PacsError, PacsUnreachable
from mris.pacs.config import PacsSettings
from mris.pacs.router import skip_reason, study_ref

# The planted identity without the UIDs (each test makes its own study).
IDENTITY = {key: value for key, value in PLANTED_IDENTITY.items() if not key.endswith("UID")}


@pytest.fixture(scope="module")
def bundles(localised_bundles) -> dict[str, Path]:
    return localised_bundles


@pytest.fixture
def orthanc(tmp_path):
    require_orthanc()
    server = OrthancServer(tmp_path / "orthanc").start()
    yield server
    server.stop()


def _settings(orthanc: OrthancServer, bundles: dict, tmp_path: Path, **overrides) -> PacsSettings:
    values = {
        "dicomweb_url": orthanc.dicomweb_url,
        "username": orthanc.auth[0],
        "password": orthanc.auth[1],
        "model_dir": bundles["model"],
        "index_root": bundles["index"],
        "state_dir": tmp_path / "state",
        "poll_s": 0.2,
        "k": 5,
    }
    return PacsSettings(**{**values, **overrides})


def cohort_radiograph(manifest: Path, number: int = 0, **tags) -> pydicom.Dataset:
    """A radiograph of the tiny cohort as a dataset, with ``tags`` set and new series and SOP
    instance UIDs (the study is given by the caller)."""
    from mris.manifest import read_manifest

    table = read_manifest(manifest)
    paths = sorted({row.radiograph_path for row in table.rows})
    ds = pydicom.dcmread(table.resolve_path(paths[number]))
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in {**IDENTITY, **tags}.items():
        setattr(ds, keyword, value)
    return ds


def as_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _study_objects(orthanc: OrthancServer, study: str) -> dict[str, int]:
    """Modality -> how many instances of it the study holds."""
    counts: dict[str, int] = {}
    for instance in orthanc.study_instances(study):
        response = requests.get(
            f"{orthanc.url}/instances/{instance['ID']}/simplified-tags", auth=orthanc.auth
        )
        modality = response.json().get("Modality", "")
        counts[modality] = counts.get(modality, 0) + 1
    return counts


def _dicomweb(orthanc: OrthancServer):
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = orthanc.auth
    return DICOMwebClient(orthanc.dicomweb_url, session=session)


def _no_identity(text: str, *uids: str) -> None:
    for secret in (*PLANTED_SECRETS, *uids):
        assert secret not in text, "an identifier reached the output"


def test_run_stores_the_sc_and_sr_into_the_study_and_counts_what_it_skipped(
    orthanc, bundles, tiny_cohort, tmp_path, monkeypatch
):
    from test_dicom_out import sr_numbers

    from mris.dicom_out import knee_numbers
    from mris.options import SynthesisOptions
    from mris.pipeline import Pipeline

    study = generate_uid()
    knee = cohort_radiograph(tiny_cohort, 0, StudyInstanceUID=study)
    chest = cohort_radiograph(tiny_cohort, 1, StudyInstanceUID=study, BodyPartExamined="CHEST")
    other = cohort_radiograph(tiny_cohort, 2, StudyInstanceUID=study, Modality="OT")
    broken = cohort_radiograph(tiny_cohort, 3, StudyInstanceUID=study)
    # A DX whose JPEG 2000 codestream is junk after its first marker: a PACS stores it (it does
    # not decode pixels), our decoder refuses it.
    broken.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(range(256)) * 4])
    broken.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    for ds in (knee, chest, other, broken):
        orthanc.upload(as_bytes(ds))
    for key, value in _settings(orthanc, bundles, tmp_path).model_dump().items():
        if value is not None:
            raw = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            monkeypatch.setenv(f"MRIS_PACS_{key.upper()}", str(raw))

    result = CliRunner().invoke(cli_app, ["pacs", "run", "--study", study, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["study"] == study_ref(study)
    assert report["synthesized"] == 1 and report["already_processed"] == 0
    assert report["skipped"] == {"not-a-knee": 1, "not-a-radiograph": 1, "unreadable": 1}
    _no_identity(result.output, study, knee.SOPInstanceUID)

    # Read the results back from the PACS over DICOMweb.
    client = _dicomweb(orthanc)
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    assert len(found) == 1
    sr_ref = found[0]
    sr = client.retrieve_instance(
        study, sr_ref["0020000E"]["Value"][0], sr_ref["00080018"]["Value"][0]
    )
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "OT"})
    sc_refs = [item for item in found if item["00080018"]["Value"][0] != other.SOPInstanceUID]
    assert len(sc_refs) == 1
    sc = client.retrieve_instance(
        study, sc_refs[0]["0020000E"]["Value"][0], sc_refs[0]["00080018"]["Value"][0]
    )
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    for ds in (sc, sr):
        assert ds.StudyInstanceUID == study
        assert (
            ds.PatientID == IDENTITY["PatientID"]
            and ds.AccessionNumber == IDENTITY["AccessionNumber"]
        )
        assert ds.SeriesInstanceUID != knee.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == knee.SOPInstanceUID
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.std() > 10
    # The SR's numbers are the pipeline's for this radiograph (same bundle, same options).
    pipeline = Pipeline.load(bundles["model"], bundles["index"], "separate", device="cpu")
    options = SynthesisOptions.parse(k=5).request_options()
    expected = {
        result.side: knee_numbers(result) for result in pipeline.run(as_bytes(knee), options)
    }
    numbers = sr_numbers(sr)
    assert set(numbers) == {(side, name) for side in expected for name in expected[side]}
    for (side, name), values in numbers.items():
        for key, value in values.items():
            assert value == pytest.approx(expected[side][name][key], abs=1e-3), (side, name, key)

    # Again: nothing new is stored, the radiograph is "already processed".
    result = CliRunner().invoke(cli_app, ["pacs", "run", "--study", study, "--json"])
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["synthesized"] == 0 and again["already_processed"] == 1
    assert again["skipped"] == {"not-a-knee": 1, "not-a-radiograph": 3, "unreadable": 1}
    assert _study_objects(orthanc, study) == {"DX": 3, "OT": 2, "SR": 1}


def test_a_radiograph_without_knees_is_skipped_not_failed(orthanc, bundles, tiny_cohort, tmp_path):
    """The localiser at its trained confidence finds no knees in noise: counted, not raised."""
    import numpy as np

    from mris.pacs.commands import open_router

    study = generate_uid()
    noise = cohort_radiograph(tiny_cohort, 0, StudyInstanceUID=study)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 1 << int(noise.BitsStored), (noise.Rows, noise.Columns))
    noise.PixelData = pixels.astype(np.uint16).tobytes()
    orthanc.upload(as_bytes(noise))
    settings = _settings(orthanc, bundles, tmp_path, model_dir=bundles["strict_model"])
    with open_router(settings) as router:
        report = router.route(study)
    assert report.synthesized == 0 and dict(report.skipped) == {"knees-not-found": 1}
    assert _study_objects(orthanc, study) == {"DX": 1}


def _wait(condition, timeout_s: float, what: str, process=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the watcher exited ({process.returncode}) before {what}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_watch_routes_each_new_study_once_across_a_restart(orthanc, bundles, tiny_cohort, tmp_path):
    settings = _settings(orthanc, bundles, tmp_path)
    metrics_port = free_port()
    env = {
        **os.environ,
        **orthanc.environment(),
        "MRIS_PACS_MODEL_DIR": str(bundles["model"]),
        "MRIS_PACS_INDEX_ROOT": str(bundles["index"]),
        "MRIS_PACS_STATE_DIR": str(settings.state_dir),
        "MRIS_PACS_POLL_S": "0.3",
        "MRIS_PACS_K": "5",
        "MRIS_PACS_METRICS_PORT": str(metrics_port),
    }
    logs = tmp_path / "watcher.log"
    command = [sys.executable, "-m", "mris.cli", "pacs", "watch"]

    def start() -> subprocess.Popen:
        with open(logs, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        _wait(settings.state_dir.joinpath("cursor.json").is_file, 90, "the cursor", process)
        return process

    def results(study: str) -> bool:
        return _study_objects(orthanc, study) == {"DX": 1, "OT": 1, "SR": 1}

    def metric(name: str) -> float:
        text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    first, second = generate_uid(), generate_uid()
    watcher = start()
    try:
        knee_one = cohort_radiograph(tiny_cohort, 0, StudyInstanceUID=first)
        orthanc.upload(as_bytes(knee_one))
        _wait(lambda: results(first), 120, "the first study's results", watcher)
        assert metric('mris_pacs_studies_total{outcome="synthesized"}') == 1
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=60) == 128 + signal.SIGTERM
        # While the watcher is down, a second study arrives; the restarted one finds it.
        knee_two = cohort_radiograph(tiny_cohort, 1, StudyInstanceUID=second)
        orthanc.upload(as_bytes(knee_two))
        watcher = start()
        _wait(lambda: results(second), 120, "the second study's results", watcher)
        # Storing the results makes the study stable again: that pass stores nothing.
        _wait(
            lambda: metric('mris_pacs_studies_total{outcome="already_processed"}') >= 1,
            60,
            "the second pass over the second study",
            watcher,
        )
        assert metric('mris_pacs_studies_total{outcome="synthesized"}') == 1
    finally:
        if watcher.poll() is None:
            watcher.send_signal(signal.SIGTERM)
            watcher.wait(timeout=60)
    assert results(first) and results(second)  # one SC and one SR each: no duplicates
    text = logs.read_text(encoding="utf-8", errors="replace")
    assert "study routed" in text
    _no_identity(text, first, second, knee_one.SOPInstanceUID, knee_two.SOPInstanceUID)


def test_a_failing_study_is_a_dead_letter_and_retry_routes_it(
    orthanc, bundles, tiny_cohort, tmp_path
):
    from mris.pacs.commands import open_router
    from mris.pacs.metrics import RouterMetrics
    from mris.pacs.watch import Watcher, WatchState, retry_dead_letters

    settings = _settings(orthanc, bundles, tmp_path, max_instances=1)
    study = generate_uid()
    metrics = RouterMetrics()
    state = WatchState(settings.state_dir)
    with open_router(settings, metrics) as router:
        watcher = Watcher(router, router.client, state, metrics, settings.poll_s)
        watcher.start()
        for number in (0, 1):  # two radiographs: more than max_instances
            orthanc.upload(as_bytes(cohort_radiograph(tiny_cohort, number, StudyInstanceUID=study)))

        def stable() -> bool:
            changes = orthanc.get("/changes", since=0, limit=1000)["Changes"]
            return any(change["ChangeType"] == "StableStudy" for change in changes)

        _wait(stable, 30, "the study to become stable")
        watcher.run(once=True)
        letters = state.dead_letters()
        assert [letter["error"] for letter in letters] == ["TooManyInstances"]
        assert letters[0]["study_instance_uid"] == study and letters[0]["study"] == study_ref(study)
        assert metrics.dead_letters._value.get() == 1
        assert state.cursor() == watcher.position and watcher.position >= 1
        assert _study_objects(orthanc, study) == {"DX": 2}
        # Fixed (a larger limit): retry routes it and empties the dead letters.
        router.max_instances = 10
        assert retry_dead_letters(router, state) == (1, 0)
    assert state.dead_letters() == []
    assert _study_objects(orthanc, study) == {"DX": 2, "OT": 2, "SR": 2}


def test_an_unreachable_pacs_is_waited_for_not_dead_lettered(tmp_path):
    from mris.pacs.metrics import RouterMetrics
    from mris.pacs.router import StudyRouter
    from mris.pacs.watch import Watcher, WatchState

    closed = f"http://127.0.0.1:{free_port()}/dicom-web"
    settings = PacsSettings(dicomweb_url=closed, state_dir=tmp_path / "state", timeout_s=2)
    client = PacsClient(settings)
    metrics = RouterMetrics()
    state = WatchState(settings.state_dir)
    router = StudyRouter(pipeline=None, client=client, sandbox=None, options=None)
    watcher = Watcher(router, client, state, metrics, poll_s=0.05)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, kwargs={"stop": stop})
    thread.start()
    _wait(lambda: metrics.pacs_unreachable._value.get() >= 3, 30, "three attempts")
    stop.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert state.dead_letters() == [] and state.cursor() is None


def test_errors_name_the_operation_and_status_never_the_url(orthanc, tmp_path):
    study = generate_uid()
    wrong = PacsSettings(
        dicomweb_url=orthanc.dicomweb_url, username=orthanc.auth[0], password="wrong"
    )
    with pytest.raises(PacsError) as refused:
        PacsClient(wrong).instances(study)
    assert not isinstance(refused.value, PacsUnreachable)
    assert refused.value.status == 401 and "QIDO-RS" in refused.value.detail
    assert "127.0.0.1" not in refused.value.detail and study not in refused.value.detail
    closed = PacsSettings(dicomweb_url=f"http://127.0.0.1:{free_port()}/dicom-web", timeout_s=2)
    with pytest.raises(PacsUnreachable) as down:
        PacsClient(closed).instances(study)
    assert "127.0.0.1" not in down.value.detail and study not in down.value.detail


@pytest.mark.parametrize(
    ("modality", "body_part", "reason"),
    [
        ("DX", "KNEE", None),
        ("CR", None, None),
        ("dx", "Lower Limb", None),
        ("DX", "LOWER_LIMB", None),
        ("DX", "CHEST", "not-a-knee"),
        ("MR", "KNEE", "not-a-radiograph"),
        ("OT", None, "not-a-radiograph"),
        ("SR", None, "not-a-radiograph"),
        (None, None, "not-a-radiograph"),
    ],
)
def test_which_instances_are_looked_at(modality, body_part, reason):
    ref = InstanceRef("1.2", "1.2.3", "1.2.3.4", None, modality, body_part)
    assert skip_reason(ref) == reason
    assert "1.2.3.4" not in repr(ref)


def test_router_entrypoint_routes_from_the_environment(orthanc, bundles, tiny_cohort, tmp_path):
    """docker/router.sh (compose's `router` service) with its settings from MRIS_PACS_*."""
    study = generate_uid()
    orthanc.upload(as_bytes(cohort_radiograph(tiny_cohort, 0, StudyInstanceUID=study)))
    _wait(
        lambda: any(
            change["ChangeType"] == "StableStudy"
            for change in orthanc.get("/changes", since=0, limit=1000)["Changes"]
        ),
        30,
        "the study to become stable",
    )
    from test_docker import _env

    env = _env(
        **orthanc.environment(),
        MRIS_PACS_MODEL_DIR=str(bundles["model"]),
        MRIS_PACS_INDEX_ROOT=str(bundles["index"]),
        MRIS_PACS_STATE_DIR=str(tmp_path / "state"),
    )
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        ["sh", "docker/router.sh", "--once", "--from-start"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _study_objects(orthanc, study) == {"DX": 1, "OT": 1, "SR": 1}
    _no_identity(done.stdout + done.stderr, study)
