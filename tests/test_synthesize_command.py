"""``mris synthesize``: one radiograph through the pipeline, the answers written to files."""

from __future__ import annotations

import json

import numpy as np
import pydicom
from conftest import PLANTED_IDENTITY, PLANTED_SECRETS, identity_dicom_bytes
from typer.testing import CliRunner

from mris.cli import app as cli_app
from mris.errors import BadParameter
from mris.service.answers import DICOM_ZIP_NAMES


def test_synthesize_writes_the_json_answer_the_picture_and_the_dicom_results(tmp_path):
    from serve_process import tiny_bundle
    from test_service import KEYPOINTS

    model, index = tiny_bundle(tmp_path / "bundle")
    dicom = tmp_path / "knee.dcm"
    dicom.write_bytes(identity_dicom_bytes())
    out = tmp_path / "out"
    args = ["synthesize", str(dicom), "--model", str(model), "--index", str(index), "--k", "3"]
    args += ["--keypoints", json.dumps(KEYPOINTS), "--json-out", str(tmp_path / "answer.json")]
    args += ["--png-out", str(tmp_path / "maps.png"), "--dicom-out", str(out)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "RIGHT knee: fc" in result.output and "LEFT knee: fc" in result.output
    assert not any(secret in result.output for secret in PLANTED_SECRETS)
    answer = json.loads((tmp_path / "answer.json").read_text())
    assert answer["k"] == 3 and len(answer["knees"]) == 2
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sc, sr = (pydicom.dcmread(out / name) for name in DICOM_ZIP_NAMES)
    source = pydicom.dcmread(dicom)
    for obj in (sc, sr):
        assert obj.StudyInstanceUID == source.StudyInstanceUID
        assert obj.PatientID == PLANTED_IDENTITY["PatientID"]
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert np.asarray(sc.pixel_array).ndim == 3


def test_synthesize_refuses_a_bad_option_naming_it(tmp_path):
    dicom = tmp_path / "knee.dcm"
    dicom.write_bytes(identity_dicom_bytes())
    result = CliRunner().invoke(cli_app, ["synthesize", str(dicom), "--nan-rule", "sometimes"])
    assert isinstance(result.exception, BadParameter)  # mris.cli.main prints it and exits 2
    assert "nan_rule" in str(result.exception)
