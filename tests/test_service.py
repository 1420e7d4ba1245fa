"""The HTTP service, started for real with uvicorn on 127.0.0.1, over a tiny real bundle.

The model bundle comes from tests/bundle_factory.py (real ONNX encoders, no localiser, so the
requests give keypoints), the index is built and published by ``mris.index`` from tiny maps, and
the radiographs are DICOMs written by pydicom with a planted PatientName.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from bundle_factory import make_map_cohort, make_model_bundle
from conftest import PLANTED_SECRETS, identity_dicom_bytes, knee_phantom, make_dicom_bytes

from mris.constants import PreprocessConfig
from mris.dicom import read_radiograph
from mris.index.build import build_index_bundle
from mris.manifest import read_manifest
from mris.roi import extract_roi
from mris.synthesis import DEFAULT_NAN_RULE, NAN_RULES
from mris.thickness import load_thickness_map, map_to_input

PLANTED = ("Secret^Patient", "PID-SECRET-123", "19500101")
TOKEN = "test-token-123"
KEYPOINTS = {"right": [38.4, 48.0], "left": [89.6, 48.0]}  # the phantom's knee blobs (128 x 96 px)
K = 5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, settings):
        import uvicorn

        from mris.service.app import create_app

        self.app = create_app(settings)
        self.port = settings.port
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the test server did not start")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    model = make_model_bundle(root / "model", encoder_px=32)
    manifest = make_map_cohort(root / "cohort", 24, seed=3)
    build_index_bundle(model, manifest, root / "index", variant="separate", publish=True, threads=1)
    return {"model": model, "manifest": manifest, "index": root / "index", "root": root}


@pytest.fixture(scope="module")
def server(bundles):
    from mris.service.config import Settings

    settings = Settings(
        model_dir=bundles["model"],
        index_root=bundles["index"],
        port=_free_port(),
        api_token=TOKEN,
        intra_op_threads=1,
        max_upload_mb=1.0,
        request_timeout_s=20,
    )
    with RunningServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def dicom_bytes() -> bytes:
    return make_dicom_bytes(knee_phantom(), imager_spacing=(0.2, 0.2))


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def _post(
    server, route: str, data: bytes, fields: dict | None = None, headers: dict | None = None, **kw
):
    fields = {"keypoints": json.dumps(KEYPOINTS), "k": str(K), **(fields or {})}
    return httpx.post(
        f"{server.url}{route}",
        files={"file": ("x.dcm", data, "application/dicom")},
        data=fields,
        headers={**_auth(), **(headers or {})},
        timeout=30,
        **kw,
    )


def _decode(map_json: dict, key: str = "data") -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(map_json[key]), dtype="<f4").reshape(map_json["shape"])


# ------------------------------------------------------------------------ an independent eq. 4
def _onnx_embed(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images.astype(np.float32)})[0]


def _expected(bundles, dicom: bytes, side: str, region: str, nan_rule: str):
    """Exact search and eq. 4 with the NaN rule asked, from the ONNX files and the maps."""
    config = PreprocessConfig(encoder_px=32)
    manifest = read_manifest(bundles["manifest"])
    rows = manifest.select(["database"])
    maps = np.stack(
        [load_thickness_map(manifest.resolve_path(getattr(r, f"{region}_path"))) for r in rows]
    )
    keys = _onnx_embed(
        bundles["model"] / f"separate-{region}-thickness.onnx",
        np.stack([map_to_input(m, config) for m in maps])[:, None],
    )
    radiograph = read_radiograph(dicom)
    centre = KEYPOINTS[side.lower()]
    roi = extract_roi(radiograph, side, centre, config)
    query = _onnx_embed(
        bundles["model"] / f"separate-{region}-radiograph.onnx", roi.image[None, None]
    )[0]
    similarity = keys @ query
    order = np.argsort(-similarity, kind="stable")[:K]
    s = similarity[order]
    w = s / s.sum()
    neighbour_maps = maps[order]
    valid = np.isfinite(neighbour_maps)
    share = np.tensordot(w, valid.astype(np.float64), axes=1)
    total = np.tensordot(w, np.where(valid, neighbour_maps, 0.0), axes=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if nan_rule == "all":  # the reference: a NaN-propagating weighted sum of the k maps
            expected = np.tensordot(w, neighbour_maps, axes=1)
        else:
            expected = np.where(share >= 0.5 - 1e-6, total / share, np.nan)
    return [rows[i].pair_id for i in order], s, w, expected


# ------------------------------------------------------------------------------------ tests
def test_health_ready_info_metrics(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert httpx.get(f"{server.url}/info").status_code == 401
    info = httpx.get(f"{server.url}/info", headers=_auth()).json()
    assert info["variant"] == "separate" and info["index_version"] == ready.json()["index_version"]
    metrics = httpx.get(f"{server.url}/metrics", headers=_auth()).text
    assert "mris_requests_total" in metrics and "mris_bundle_info" in metrics


@pytest.mark.parametrize("nan_rule", NAN_RULES)
def test_synthesize_equals_eq4_computed_independently(server, bundles, dicom_bytes, nan_rule):
    response = _post(server, "/synthesize", dicom_bytes, {"nan_rule": nan_rule})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["nan_rule"] == nan_rule
    assert [knee["side"] for knee in answer["knees"]] == ["RIGHT", "LEFT"]
    for knee in answer["knees"]:
        assert (
            knee["roi"]["source"] == "caller"
            and knee["roi"]["spacing_source"] == "ImagerPixelSpacing"
        )
        assert knee["roi"]["size_px"] == pytest.approx(140 / 0.2)
        for region in ("fc", "tc"):
            ids, similarities, weights, expected = _expected(
                bundles, dicom_bytes, knee["side"], region, nan_rule
            )
            got = knee["neighbours"][region]
            assert [n["id"] for n in got] == ids
            np.testing.assert_allclose([n["similarity"] for n in got], similarities, atol=1e-5)
            np.testing.assert_allclose([n["weight"] for n in got], weights, atol=1e-5)
            synthesized = _decode(knee["maps"][region])
            np.testing.assert_array_equal(np.isnan(synthesized), np.isnan(expected))
            np.testing.assert_allclose(synthesized, expected, atol=1e-4, equal_nan=True)
            std = _decode(knee["maps"][region], "std")
            assert std.shape == synthesized.shape and np.all(np.nan_to_num(std) >= 0)


def test_retrieve_agrees_with_synthesize(server, dicom_bytes):
    synthesized = _post(server, "/synthesize", dicom_bytes).json()
    retrieved = _post(server, "/retrieve", dicom_bytes).json()
    assert synthesized["nan_rule"] == DEFAULT_NAN_RULE  # no nan_rule given: the service's default
    for a, b in zip(synthesized["knees"], retrieved["knees"]):
        for region in ("fc", "tc"):
            assert [n["id"] for n in a["neighbours"][region]] == [
                n["id"] for n in b["neighbours"][region]
            ]
            assert {"subject_id", "side", "visit_month", "klg"} <= set(b["neighbours"][region][0])
        assert "maps" not in b


def test_dicom_body_with_query_parameters_and_formats(server, dicom_bytes):
    params = {
        "keypoints": json.dumps(KEYPOINTS),
        "knees": "left",
        "k": "3",
        "format": "npz",
        "nan_rule": "all",
    }
    response = httpx.post(
        f"{server.url}/synthesize",
        content=dicom_bytes,
        params=params,
        headers={**_auth(), "Content-Type": "application/dicom"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    arrays = np.load(io.BytesIO(response.content))
    assert {"left_fc", "left_fc_std", "left_tc", "left_tc_std", "meta"} <= set(arrays.files)
    meta = json.loads(str(arrays["meta"]))
    assert (
        meta["k"] == 3
        and meta["nan_rule"] == "all"
        and [k["side"] for k in meta["knees"]] == ["LEFT"]
    )
    png = _post(server, "/synthesize", dicom_bytes, {"format": "png"})
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def _rgb_dicom() -> bytes:
    import pydicom

    data = make_dicom_bytes(knee_phantom())
    ds = pydicom.dcmread(io.BytesIO(data))
    rgb = np.repeat((knee_phantom() >> 4).astype(np.uint8)[..., None], 3, axis=2)
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _multiframe_dicom() -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(knee_phantom())))
    ds.NumberOfFrames = 2
    ds.PixelData = knee_phantom().tobytes() * 2
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _header_bomb() -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(make_dicom_bytes(knee_phantom())))
    ds.Rows = ds.Columns = 30000
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


BAD_UPLOADS = {
    "truncated": (lambda d: d[: len(d) // 2], {}, 400),
    "empty": (lambda d: b"", {}, 400),
    "not dicom": (lambda d: b"%PDF-1.4 hello" * 50, {}, 400),
    "header bomb": (lambda d: _header_bomb(), {}, 413),
    "no spacing": (lambda d: make_dicom_bytes(knee_phantom(), imager_spacing=None), {}, 400),
    "rgb": (lambda d: _rgb_dicom(), {}, 400),
    "multi-frame": (lambda d: _multiframe_dicom(), {}, 400),
    "1x1": (lambda d: make_dicom_bytes(np.zeros((1, 1), np.uint16)), {}, 400),
    "bad k": (lambda d: d, {"k": "0"}, 422),
    "k not a number": (lambda d: d, {"k": "many"}, 422),
    "bad knees": (lambda d: d, {"knees": "middle"}, 422),
    "bad keypoints json": (lambda d: d, {"keypoints": "{left: 1"}, 422),
    "keypoints lack a knee": (lambda d: d, {"keypoints": json.dumps({"left": [80, 48]})}, 422),
    "keypoint outside the image": (
        lambda d: d,
        {"keypoints": json.dumps({"left": [900, 48], "right": [30, 48]})},
        422,
    ),
    "bad spacing_mm": (lambda d: d, {"spacing_mm": "-1"}, 422),
    "too large": (lambda d: d + b"\0" * (1 << 20), {}, 413),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_input_gives_problem_json(server, dicom_bytes, case):
    make, fields, status = BAD_UPLOADS[case]
    response = _post(server, "/synthesize", make(dicom_bytes), fields)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and problem["detail"]
    for secret in PLANTED:
        assert secret not in response.text


def test_no_spacing_is_fine_with_spacing_mm(server):
    data = make_dicom_bytes(knee_phantom(), imager_spacing=None)
    response = _post(server, "/synthesize", data, {"spacing_mm": "0.2"})
    assert response.status_code == 200, response.text
    assert response.json()["knees"][0]["roi"]["spacing_source"] == "caller"


def test_wrong_media_type_and_missing_field(server, dicom_bytes):
    response = httpx.post(
        f"{server.url}/synthesize",
        content=b"{}",
        headers={**_auth(), "Content-Type": "application/json"},
    )
    assert response.status_code == 415 and response.headers["content-type"].startswith(
        "application/problem+json"
    )
    response = httpx.post(
        f"{server.url}/synthesize", files={"other": ("x", dicom_bytes)}, headers=_auth()
    )
    assert response.status_code == 422


def test_token_is_enforced(server, dicom_bytes):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        response = httpx.post(
            f"{server.url}/retrieve",
            files={"file": ("x.dcm", dicom_bytes)},
            data={"keypoints": json.dumps(KEYPOINTS)},
            headers=headers,
        )
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
    assert httpx.post(f"{server.url}/admin/reload").status_code == 401
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_no_patient_identifier_in_logs(server, dicom_bytes):
    import logging

    from mris.service.logging_setup import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    loggers = [logging.getLogger(name) for name in ("mris", "uvicorn")]
    for logger in loggers:
        logger.addHandler(handler)
    # A file with every identity attribute a DICOM result copies (mris.dicom.SourceIdentity),
    # which the pipeline carries from the decode sandbox to Prepared.source.
    identity = identity_dicom_bytes()
    answers = []
    try:
        _post(server, "/synthesize", dicom_bytes)
        _post(server, "/synthesize", dicom_bytes[:300])
        _post(server, "/retrieve", dicom_bytes, {"k": "500"})
        _post(server, "/synthesize", _rgb_dicom())
        for route, fields in (
            ("/synthesize", {}),
            ("/retrieve", {}),
            ("/synthesize", {"k": "0"}),
            ("/synthesize", {"format": "npz"}),
        ):
            answers.append(_post(server, route, identity, fields))
        answers.append(_post(server, "/synthesize", identity[:-5000]))  # truncated pixel data
        time.sleep(0.2)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    logs = stream.getvalue()
    assert '"route": "/synthesize"' in logs  # the JSON request log was captured
    assert [a.status_code for a in answers] == [200, 200, 422, 200, 400]
    for secret in PLANTED + PLANTED_SECRETS:
        assert secret not in logs
    for answer in answers:  # nor in an answer (maps, neighbours, problem details)
        for secret in PLANTED_SECRETS:
            assert secret.encode() not in answer.content


def test_reload_during_a_burst_fails_no_request(server, bundles, dicom_bytes):
    before = httpx.get(f"{server.url}/readyz").json()["index_version"]
    result = build_index_bundle(
        bundles["model"],
        bundles["manifest"],
        bundles["index"],
        variant="separate",
        publish=True,
        threads=1,
    )
    statuses: list[int] = []

    def one(_):
        return _post(server, "/retrieve", dicom_bytes).status_code

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        reload = httpx.post(f"{server.url}/admin/reload", headers=_auth(), timeout=30)
        statuses = [f.result(timeout=60) for f in futures]
    assert reload.status_code == 200, reload.text
    assert reload.json()["previous_version"] == before
    assert reload.json()["index_version"] == result.version != before
    assert statuses == [200] * len(statuses)
    assert httpx.get(f"{server.url}/readyz").json()["index_version"] == result.version


def test_reloads_release_the_bundles_they_replace(server):
    """Nothing pins a replaced bundle (the app's startup frame held the first one, the
    micro-batcher its last batch's; repeated reloads grew a demo server from 550 MB to 2 GB)."""
    import gc
    import weakref

    replaced = weakref.ref(server.app.state.holder.current.pipeline)
    for _ in range(2):
        assert (
            httpx.post(f"{server.url}/admin/reload", headers=_auth(), timeout=30).status_code == 200
        )
    gc.collect()
    assert replaced() is None


def test_failed_reload_keeps_the_old_bundle(server, bundles, tmp_path):
    from mris.index.publish import publish

    before = httpx.get(f"{server.url}/readyz").json()["index_version"]
    root = bundles["index"]
    broken = root / "20000101T000000000000Z-abcdef"
    broken.mkdir()
    (broken / "card.json").write_text("{not json")
    publish(root, broken.name)
    try:
        response = httpx.post(f"{server.url}/admin/reload", headers=_auth(), timeout=30)
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "keeps serving" in response.json()["detail"]
        assert httpx.get(f"{server.url}/readyz").json()["index_version"] == before
    finally:
        publish(root, before)


def _drop_preprocessing_version(card_path: Path) -> None:
    """Make a card look written by an mris before ``PREPROCESSING_VERSION`` existed."""
    card = json.loads(card_path.read_text())
    card.pop("preprocessing_version")
    card_path.write_text(json.dumps(card))


def test_reload_refuses_an_index_of_an_older_roi_normalisation(server, bundles):
    from mris.index.publish import publish

    before = httpx.get(f"{server.url}/readyz").json()["index_version"]
    root = bundles["index"]
    old = root / "20000101T000000000000Z-0ld000"
    shutil.copytree(root / before, old)
    _drop_preprocessing_version(old / "card.json")
    publish(root, old.name)
    try:
        response = httpx.post(f"{server.url}/admin/reload", headers=_auth(), timeout=30)
        assert response.status_code == 503
        detail = response.json()["detail"]
        assert (
            "older ROI normalisation" in detail
            and "mris index build" in detail
            and "keeps serving" in detail
        )
        assert httpx.get(f"{server.url}/readyz").json()["index_version"] == before
    finally:
        publish(root, before)


def test_not_ready_on_a_model_of_an_older_roi_normalisation(bundles, tmp_path):
    from mris.service.config import Settings

    model = tmp_path / "old-model"
    shutil.copytree(bundles["model"], model)
    _drop_preprocessing_version(model / "card.json")
    settings = Settings(
        model_dir=model, index_root=bundles["index"], port=_free_port(), intra_op_threads=1
    )
    with RunningServer(settings) as running:
        response = httpx.get(f"{running.url}/readyz")
        assert response.status_code == 503
        assert "older ROI normalisation" in response.json()["detail"]
        assert "mris train" in response.json()["detail"]


def test_not_ready_without_a_bundle(tmp_path):
    from mris.service.config import Settings

    settings = Settings(
        model_dir=tmp_path / "none", index_root=tmp_path / "none", port=_free_port()
    )
    with RunningServer(settings) as running:
        response = httpx.get(f"{running.url}/readyz")
        assert response.status_code == 503 and response.headers["content-type"].startswith(
            "application/problem+json"
        )
        data = make_dicom_bytes(knee_phantom())
        response = httpx.post(f"{running.url}/synthesize", files={"file": ("x.dcm", data)})
        assert response.status_code == 503


def test_full_queue_answers_503_with_retry_after(bundles, dicom_bytes):
    from mris.service.config import Settings

    settings = Settings(
        model_dir=bundles["model"],
        index_root=bundles["index"],
        port=_free_port(),
        max_queue=1,
        intra_op_threads=1,
    )
    with RunningServer(settings) as running:
        both = httpx.post(
            f"{running.url}/synthesize",
            files={"file": ("x.dcm", dicom_bytes)},
            data={"keypoints": json.dumps(KEYPOINTS)},
            timeout=30,
        )
        assert both.status_code == 503 and both.headers["retry-after"] == "1"
        assert both.headers["content-type"].startswith("application/problem+json")
        one = httpx.post(
            f"{running.url}/synthesize",
            files={"file": ("x.dcm", dicom_bytes)},
            data={"keypoints": json.dumps(KEYPOINTS), "knees": "left"},
            timeout=30,
        )
        assert one.status_code == 200


# ------------------------------------------------------------------ dependencies and reloads
def test_routes_read_no_app_state():
    """Routes take what they need from mris.service.deps' Annotated aliases (issue 15)."""
    import mris.service.routes as routes

    assert "app.state" not in Path(routes.__file__).read_text(encoding="utf-8")


def _bundle_info(metrics_text: str) -> list[str]:
    import re

    return re.findall(
        r'^mris_bundle_info\{index_version="([^"]+)",variant="separate"\} 1\.0$',
        metrics_text,
        flags=re.MULTILINE,
    )


def _reloads(metrics_text: str, outcome: str) -> float:
    import re

    found = re.search(
        rf'^mris_reloads_total\{{outcome="{outcome}"\}} (\S+)$', metrics_text, flags=re.MULTILINE
    )
    return float(found.group(1)) if found else 0.0


def test_every_reload_path_updates_the_served_bundle_metric(bundles, tmp_path):
    """Startup, POST /admin/reload and the SIGHUP handler are one path (StateHolder.reload):
    each leaves mris_bundle_info naming the bundle now served."""
    from fastapi.testclient import TestClient

    from mris.service.app import _reload_on_signal, create_app
    from mris.service.config import Settings

    index = tmp_path / "index"

    def publish_new() -> str:
        return build_index_bundle(
            bundles["model"],
            bundles["manifest"],
            index,
            variant="separate",
            publish=True,
            threads=1,
        ).version

    first = publish_new()
    settings = Settings(
        model_dir=bundles["model"],
        index_root=index,
        api_token=TOKEN,
        intra_op_threads=1,
        decode_workers=1,
    )
    app = create_app(settings)
    with TestClient(app) as client:  # runs the lifespan: the startup load

        def metrics_text() -> str:
            return client.get("/metrics", headers=_auth()).text

        assert _bundle_info(metrics_text()) == [first]
        assert _reloads(metrics_text(), "ok") == 0  # the startup load is no reload
        second = publish_new()
        assert client.post("/admin/reload", headers=_auth()).json()["index_version"] == second
        assert _bundle_info(metrics_text()) == [second]
        third = publish_new()
        client.portal.call(_reload_on_signal, app)  # what SIGHUP schedules, on the app's loop
        assert client.get("/readyz").json()["index_version"] == third
        assert _bundle_info(metrics_text()) == [third]
        assert _reloads(metrics_text(), "ok") == 2
        (index / "current").unlink()  # nothing to load: a failed reload, counted, still serving
        client.portal.call(_reload_on_signal, app)
        assert _reloads(metrics_text(), "failed") == 1
        assert _bundle_info(metrics_text()) == [third]


def test_synthesize_as_dicom_gives_a_secondary_capture_and_an_sr_in_the_source_study(server):
    import zipfile

    import pydicom
    from conftest import PLANTED_IDENTITY, identity_dicom_bytes

    from mris.service.answers import DICOM_ZIP_NAMES

    dicom_bytes = identity_dicom_bytes()

    params = {"keypoints": json.dumps(KEYPOINTS), "k": "3", "format": "dicom"}
    answer = _post(server, "/synthesize", dicom_bytes, params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/zip"
    source = pydicom.dcmread(io.BytesIO(dicom_bytes))
    with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
        assert archive.namelist() == list(DICOM_ZIP_NAMES)
        sc, sr = (pydicom.dcmread(io.BytesIO(archive.read(name))) for name in DICOM_ZIP_NAMES)
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    for obj in (sc, sr):
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.PatientID == PLANTED_IDENTITY["PatientID"]
        assert obj.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    # the SR's overall femoral mean equals the JSON answer's map mean
    body = _post(server, "/synthesize", dicom_bytes, {**params, "format": "json"}).json()
    knee = body["knees"][0]
    fc = np.frombuffer(base64.b64decode(knee["maps"]["fc"]["data"]), "<f4")
    values = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _sr_items(sr)
        if item.get("ValueType") == "NUM" and item.get("MeasuredValueSequence")
    ]
    assert any(abs(value - float(np.nanmean(fc))) < 1e-3 for value in values)


def _sr_items(dataset):
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _sr_items(item)


def test_api_docs_load_everything_from_the_service():
    """/docs and /redoc name no other host: their scripts, styles and icon are the package's
    (fastapi-offline), so the pages work on an offline machine."""
    import re

    from fastapi.testclient import TestClient

    from mris.service.app import create_app
    from mris.service.config import Settings

    client = TestClient(create_app(Settings()))
    for path in ("/docs", "/redoc"):
        page = client.get(path)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "http://" not in page.text and "https://" not in page.text, path
        assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
        assert any(asset.endswith(".js") for asset in assets), path
        for asset in assets:
            assert client.get(asset).status_code == 200, asset
    assert client.get("/openapi.json").json()["info"]["title"] == "MRIS"
