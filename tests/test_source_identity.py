"""The source's identity (``mris.dicom.SourceIdentity``): read once by ``read_radiograph``,
carried beside the de-identified pixels through the decode sandbox and onto ``Prepared``, and
never shown: not in ``repr``/``str``, not in ``metadata``, not in an error message. (The
service's logs: ``test_service.test_no_patient_identifier_in_logs``.)"""

from __future__ import annotations

import json
import pickle
from dataclasses import fields

import pytest
from conftest import (
    PLANTED_IDENTITY,
    PLANTED_SECRETS,
    identity_dicom_bytes,
    knee_phantom,
    make_dicom_bytes,
    write_dataset,
)
from pydicom import uid

from mris.dicom import (
    SOURCE_IDENTITY_TAGS,
    DecodeLimits,
    Radiograph,
    SourceIdentity,
    read_radiograph,
)
from mris.errors import MrisError
from mris.sandbox import DecodeSandbox, _read_in_worker, _SharedPixels

EXPECTED = {
    **PLANTED_IDENTITY,
    "SOPClassUID": uid.DigitalXRayImageStorageForPresentation,
    "SpecificCharacterSet": None,
    "Laterality": None,
}


@pytest.fixture(scope="module")
def dicom() -> bytes:
    return identity_dicom_bytes()


def _check_identity(identity: SourceIdentity | None) -> None:
    assert isinstance(identity, SourceIdentity)
    for name, keyword in SOURCE_IDENTITY_TAGS.items():
        assert getattr(identity, name) == EXPECTED.get(keyword), keyword
    assert identity.as_keywords() == {k: v for k, v in EXPECTED.items() if v is not None}


def _check_hidden(text: str) -> None:
    for secret in PLANTED_SECRETS:
        assert secret not in text


def test_read_radiograph_carries_the_identity(dicom):
    radiograph = read_radiograph(dicom)
    _check_identity(radiograph.source)
    assert set(SOURCE_IDENTITY_TAGS) == {item.name for item in fields(SourceIdentity)}
    _check_hidden(json.dumps(radiograph.metadata))  # metadata stays technical-only


def test_no_repr_or_str_shows_a_value(dicom):
    radiograph = read_radiograph(dicom)
    identity = radiograph.source
    assert repr(identity) == str(identity) == "SourceIdentity(<15 fields set>)"
    assert repr(SourceIdentity()) == "SourceIdentity(<0 fields set>)"
    shown = (repr(radiograph), str(radiograph), repr(identity), f"{identity}", str([identity]))
    _check_hidden(" ".join(shown))


def test_a_file_without_identity_tags_reads_as_before():
    from pydicom import dcmread
    from pydicom.filebase import DicomBytesIO

    ds = dcmread(DicomBytesIO(make_dicom_bytes(knee_phantom())))
    for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
        del ds[keyword]
    radiograph = read_radiograph(write_dataset(ds))
    assert radiograph.source.patient_name is None and radiograph.source.patient_id is None
    assert radiograph.source.sop_instance_uid == ds.SOPInstanceUID
    assert Radiograph(radiograph.pixels, 0.2, "caller").source is None  # pixels from no file


def test_errors_hold_no_identity(dicom):
    with pytest.raises(MrisError) as info:
        read_radiograph(dicom[: len(dicom) - 5000])  # truncated pixel data
    _check_hidden(str(info.value) + info.value.detail)


def test_identity_survives_the_sandbox_transport(dicom):
    # What a worker sends back (shared-memory pixels, or the Radiograph itself when /dev/shm is
    # full) goes through pickle; the identity must come out whole, and its repr stays blank.
    result = _read_in_worker(dicom, None, DecodeLimits(), 768)
    assert isinstance(result, _SharedPixels)
    _check_hidden(repr(result))
    _check_identity(pickle.loads(pickle.dumps(result)).take().source)
    _check_identity(pickle.loads(pickle.dumps(read_radiograph(dicom))).source)


def test_identity_through_the_sandbox(dicom):
    with DecodeSandbox(workers=1, memory_mb=768, timeout_s=8) as box:
        radiograph = box.read(dicom)
    _check_identity(radiograph.source)
    _check_hidden(repr(radiograph))


def test_prepared_carries_the_identity(tmp_path, dicom):
    from serve_process import tiny_bundle
    from test_service import KEYPOINTS

    from mris.pipeline import Pipeline, RequestOptions
    from mris.roi import parse_keypoints

    model, index = tiny_bundle(tmp_path)
    pipeline = Pipeline.load(model, index, device="cpu", intra_op_threads=1)
    options = RequestOptions(keypoints=parse_keypoints(json.dumps(KEYPOINTS)), k=5)
    for given in (dicom, read_radiograph(dicom)):  # decoded here, or by the sandbox beforehand
        prepared = pipeline.prepare(given, options)
        _check_identity(prepared.source)
        _check_hidden(repr(prepared) + str(prepared))
        results = pipeline.assemble(prepared, pipeline.search(prepared.rois, 5), 5)
        _check_hidden(repr(results))
