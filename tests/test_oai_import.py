"""mris.oai_import and the ingest commands on a miniature OAI tree (tiny real files)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import knee_phantom, make_dicom_bytes
from typer.testing import CliRunner

from mris.cli import app
from mris.errors import BadParameter, MrisError
from mris.ingest_commands import parse_keypoints
from mris.manifest import read_manifest
from mris.oai_import import import_oai, parse_month, parse_point, xray_visit_month

XRAYS = {  # (patient, month) -> OAI X-ray folder (visit code before the first '.')
    ("9000001", 0): "0.C.2/9000001/20040101/00001",
    ("9000001", 12): "1.C.2/9000001/20050101/00002",
    ("9000002", 0): "0.C.2/9000002/20040202/00003",
    ("9000003", 0): "0.C.2/9000003/20040303/00004",
    ("9000003", 24): "3.C.2/9000003/20060303/00005",
    ("9000004", 0): "0.C.2/9000004/20040404/00006",
}


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def _maps(root: Path, patient: str, side: str, month: int, only_fc: bool = False) -> None:
    folder = "ENROLLMENT" if month == 0 else f"{month:02d}_MONTH"
    avsm = root / patient / "MR_SAG_3D_DESS" / f"{side}_KNEE" / folder / "avsm"
    avsm.mkdir(parents=True, exist_ok=True)
    thickness = np.full((8, 8), np.nan, dtype=np.float32)
    thickness[2:6, 2:6] = 2.0
    np.save(avsm / "FC_2d_thickness.npy", thickness)
    if not only_fc:
        np.save(avsm / "TC_2d_thickness.npy", thickness)


@pytest.fixture
def oai_tree(tmp_path: Path) -> dict[str, Path]:
    sheets, xray_root, maps = tmp_path / "sheets", tmp_path / "xray", tmp_path / "maps"
    dicom = make_dicom_bytes(knee_phantom(32, 48), bits_stored=12)
    for (patient, month), folder in XRAYS.items():
        if (patient, month) == ("9000003", 24):
            continue  # radiograph missing
        (xray_root / folder).mkdir(parents=True)
        (xray_root / folder / "001").write_bytes(dicom)
    for patient, month in XRAYS:
        for side in ("LEFT", "RIGHT"):
            _maps(maps, patient, side, month, only_fc=(patient, side) == ("9000004", "LEFT"))
    header = ["patient_id", "month", "mri_left", "mri_right", "xray"]

    def row(patient: str, month: int, left: str = "1", right: str = "1") -> list[str]:
        return [patient, f"{month:02d}_MONTH", left, right, XRAYS[(patient, month)]]

    _write_csv(
        sheets / "test_set" / "mri_xray.csv", header, [row("9000001", 0), row("9000001", 12)]
    )
    _write_csv(
        sheets / "train_set" / "fold1" / "mri_xray.csv", header, [row("9000002", 0, right="NA")]
    )
    _write_csv(
        sheets / "train_set" / "fold2" / "mri_xray.csv",
        header,
        [row("9000003", 0), row("9000003", 24)],
    )
    _write_csv(sheets / "train_set" / "fold3" / "mri_xray.csv", header, [row("9000004", 0)])
    _write_csv(
        sheets / "test_set" / "xray_keypoints.csv",
        ["patient_id", "month", "keypoint_right", "keypoint_left"],
        [
            ["9000001", "00_MONTH", '"[10, 20]"', '"[40.5, 21]"'],
            ["9000001", "12_MONTH", '"[11, 19]"', "NA"],
        ],
    )
    _write_csv(
        sheets / "train_set" / "fold2" / "xray_keypoints.csv",
        ["patient_id", "month", "keypoint_right", "keypoint_left"],
        [["9000003", "00_MONTH", '"[12, 16]"', '"[36, 16]"']],
    )
    klg = tmp_path / "kxr.txt"
    klg.write_text(
        "ID|SIDE|READPRJ|V00XRKL|V01XRKL|V03XRKL\n"
        "9000001|1|15|2|3|NA\n"
        "9000001|2|15|NA|0|NA\n"
        "9000001|2|37|1|NA|NA\n"  # a second reading project fills the gap
        "9000003|2|15|4|NA|4\n"
    )
    return {"sheets": sheets, "xray": xray_root, "maps": maps, "klg": klg, "root": tmp_path}


def test_import_row_by_row(oai_tree):
    summary = import_oai(
        oai_tree["sheets"],
        oai_tree["xray"],
        oai_tree["maps"],
        oai_tree["klg"],
        downstream_folds=["fold2"],
    )
    rows = {row.pair_id: row for row in summary.rows}
    expected = {
        # pair_id: (subject, side, month, split, keypoint, klg)
        "9000001_RIGHT_000": ("9000001", "RIGHT", 0, "test", (10.0, 20.0), 2),
        "9000001_LEFT_000": ("9000001", "LEFT", 0, "test", (40.5, 21.0), 1),
        "9000001_RIGHT_012": ("9000001", "RIGHT", 12, "test", (11.0, 19.0), 3),
        "9000001_LEFT_012": ("9000001", "LEFT", 12, "test", None, 0),
        "9000002_LEFT_000": ("9000002", "LEFT", 0, "database", None, None),
        "9000003_RIGHT_000": ("9000003", "RIGHT", 0, "downstream", (12.0, 16.0), None),
        "9000003_LEFT_000": ("9000003", "LEFT", 0, "downstream", (36.0, 16.0), 4),
        "9000004_RIGHT_000": ("9000004", "RIGHT", 0, "database", None, None),
    }
    assert set(rows) == set(expected)
    for pair_id, (subject, side, month, split, point, grade) in expected.items():
        row = rows[pair_id]
        assert (row.subject_id, row.side, row.visit_month, row.split, row.klg) == (
            subject,
            side,
            month,
            split,
            grade,
        ), pair_id
        assert (None if row.keypoint_x is None else (row.keypoint_x, row.keypoint_y)) == point
        assert Path(row.radiograph_path).is_file() and Path(row.radiograph_path).name == "001"
        assert Path(row.fc_path).name == "FC_2d_thickness.npy" and Path(row.tc_path).is_file()
        folder = "ENROLLMENT" if month == 0 else f"{month:02d}_MONTH"
        assert f"{side}_KNEE/{folder}/avsm" in row.fc_path
    assert rows["9000001_RIGHT_012"].extra["xray_month"] == "12"
    assert summary.rows_read == 6
    assert summary.skipped == {
        "no MR for this knee": 1,
        "radiograph missing": 2,
        "thickness map missing": 1,
    }
    assert summary.knee_visits == 12


def test_cli_import_writes_the_manifest(oai_tree):
    out = oai_tree["root"] / "manifest.csv"
    result = CliRunner().invoke(
        app,
        [
            "import-oai",
            "--sheets",
            str(oai_tree["sheets"]),
            "--xray-root",
            str(oai_tree["xray"]),
            "--thickness-root",
            str(oai_tree["maps"]),
            "--klg",
            str(oai_tree["klg"]),
            "--downstream-folds",
            "2,3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "rows written: 8" in result.output
    assert "skipped (radiograph missing): 2" in result.output
    manifest = read_manifest(out)
    assert len(manifest) == 8
    splits = {row.pair_id: row.split for row in manifest.rows}
    assert splits["9000004_RIGHT_000"] == "downstream" and splits["9000002_LEFT_000"] == "database"


def test_bad_options(oai_tree):
    with pytest.raises(BadParameter):
        import_oai(oai_tree["sheets"], oai_tree["xray"], oai_tree["root"] / "nope")
    with pytest.raises(BadParameter):
        import_oai(
            oai_tree["sheets"], oai_tree["xray"], oai_tree["maps"], downstream_folds=["train"]
        )
    with pytest.raises(BadParameter):
        import_oai(oai_tree["maps"], oai_tree["xray"], oai_tree["maps"])  # no sheets there


def test_parsers():
    assert (
        parse_month("00_MONTH") == 0
        and parse_month("12_MONTH") == 12
        and parse_month("ENROLLMENT") == 0
    )
    assert [xray_visit_month(f"{code}.C.2/x") for code in (0, 1, 2, 3, 4, 5, 6, 8, 10)] == [
        0,
        12,
        18,
        24,
        30,
        36,
        48,
        72,
        96,
    ]
    assert xray_visit_month("7.C.2/x") is None
    assert parse_point("[1, 2.5]") == (1.0, 2.5) and parse_point("NA") is None


def test_parse_keypoints():
    assert parse_keypoints('{"left": [300, 10], "right": [100, 12]}') == {
        "RIGHT": (100.0, 12.0),
        "LEFT": (300.0, 10.0),
    }
    for bad in ("[1, 2]", '{"middle": [1, 2]}', '{"left": [1]}', "not json"):
        with pytest.raises(BadParameter):
            parse_keypoints(bad)


def test_cli_roi_renders_png(tmp_path):
    dicom = tmp_path / "knees.dcm"
    dicom.write_bytes(
        make_dicom_bytes(knee_phantom(300, 400), bits_stored=12, imager_spacing=(0.5, 0.5))
    )
    out = tmp_path / "roi.png"
    keypoints = json.dumps({"right": [120, 150], "left": [280, 150]})
    result = CliRunner().invoke(
        app, ["roi", str(dicom), "--keypoints", keypoints, "--encoder-px", "64", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "RIGHT: centre (120, 150) px, ROI 280.0 px" in result.output


def test_cli_roi_requires_keypoints_or_a_localiser(tmp_path):
    dicom = tmp_path / "knees.dcm"
    dicom.write_bytes(make_dicom_bytes(knee_phantom(), bits_stored=12))
    result = CliRunner().invoke(app, ["roi", str(dicom), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0
    assert isinstance(result.exception, MrisError) and "--keypoints" in result.exception.detail
    assert "--model" in result.exception.detail


def test_cli_roi_refuses_a_pixel_format_the_service_refuses(tmp_path):
    """32-bit words holding float32 values (not a DX format): ``mris roi`` refuses the file as the
    pipeline and the service do, instead of cropping garbage (issue 12)."""
    from mris.errors import UnsupportedDicom

    dicom = tmp_path / "float.dcm"
    dicom.write_bytes(make_dicom_bytes(knee_phantom().astype(np.float32).view(np.uint32)))
    keypoints = json.dumps({"right": [38, 48], "left": [90, 48]})
    result = CliRunner().invoke(
        app, ["roi", str(dicom), "--keypoints", keypoints, "--out", str(tmp_path / "x.png")]
    )
    assert isinstance(result.exception, UnsupportedDicom), result.output
    assert "BitsAllocated 32" in result.exception.detail
    assert not (tmp_path / "x.png").exists()
