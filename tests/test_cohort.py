"""The synthetic cohort: determinism, DICOM readability, sides, CLI behaviour (no mocks)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mris.cohort.generate import CohortConfig, generate_cohort
from mris.manifest import read_manifest

SUBJECTS = 10


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort_pair(tmp_path_factory) -> tuple[Path, Path]:
    """The same seed twice, once in-process and once with two workers."""
    first = tmp_path_factory.mktemp("cohort_a")
    second = tmp_path_factory.mktemp("cohort_b")
    generate_cohort(CohortConfig(out=first, subjects=SUBJECTS, seed=11, workers=1))
    generate_cohort(CohortConfig(out=second, subjects=SUBJECTS, seed=11, workers=2))
    return first, second


def test_same_seed_gives_identical_manifest_maps_and_pixels(cohort_pair):
    first, second = cohort_pair
    assert _digest(first / "manifest.csv") == _digest(second / "manifest.csv")
    manifest = read_manifest(first / "manifest.csv")
    for row in manifest.rows:
        for rel in (row.fc_path, row.tc_path):
            assert _digest(first / rel) == _digest(second / rel)
    for rel in sorted({row.radiograph_path for row in manifest.rows}):
        a, b = pydicom.dcmread(first / rel), pydicom.dcmread(second / rel)
        assert np.array_equal(a.pixel_array, b.pixel_array)
        assert a.SOPInstanceUID == b.SOPInstanceUID


def test_different_seed_differs(cohort_pair, tmp_path):
    generate_cohort(CohortConfig(out=tmp_path, subjects=3, seed=12, workers=1))
    first, _ = cohort_pair
    assert (tmp_path / "manifest.csv").read_text() != (first / "manifest.csv").read_text()


def test_manifest_contract(cohort_pair):
    first, _ = cohort_pair
    manifest = read_manifest(first / "manifest.csv")
    rows = manifest.rows
    assert len({r.pair_id for r in rows}) == len(rows)
    assert {r.split for r in rows} <= {"database", "downstream", "test"}
    for row in rows:
        assert row.pair_id == f"{row.subject_id}_{row.side[0]}_{row.visit_month:03d}"
        assert 0 <= row.klg <= 4 and row.progressor in (0, 1)
        assert not Path(row.radiograph_path).is_absolute()
        assert manifest.resolve_path(row.fc_path).is_file()
        assert row.extra["sex"] in ("F", "M")
    # One radiograph per subject-visit, shared by its two knees; both knees at each visit.
    by_image: dict[str, set[str]] = {}
    for row in rows:
        by_image.setdefault(row.radiograph_path, set()).add(row.side)
    assert all(sides == {"LEFT", "RIGHT"} for sides in by_image.values())
    # A subject's splits never mix.
    splits: dict[str, set[str]] = {}
    for row in rows:
        splits.setdefault(row.subject_id, set()).add(row.split)
    assert all(len(s) == 1 for s in splits.values())
    assert (first / "cohort_stats.json").is_file() and (
        first / "preview.png"
    ).stat().st_size > 10_000


def test_maps_are_float32_mm_with_nan_outside(cohort_pair):
    first, _ = cohort_pair
    row = read_manifest(first / "manifest.csv").rows[0]
    fc = np.load(first / row.fc_path)
    tc = np.load(first / row.tc_path)
    for thickness in (fc, tc):
        assert thickness.dtype == np.float32 and thickness.shape == (128, 128)
        assert 0.25 < np.isnan(thickness).mean() < 0.6
        assert 1.0 < np.nanmean(thickness) < 4.0 and np.nanmin(thickness) >= 0


def test_every_dicom_reads_including_compressed(cohort_pair):
    first, _ = cohort_pair
    syntaxes, photometric = set(), set()
    manifest = read_manifest(first / "manifest.csv")
    for rel in sorted({r.radiograph_path for r in manifest.rows}):
        ds = pydicom.dcmread(first / rel)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and 350 <= ds.Columns <= 460
        assert ds.Modality == "DX" and ds.BitsStored == 12 and ds.BitsAllocated == 16
        assert int(pixels.max()) <= 4095
        assert "ImagerPixelSpacing" in ds or "PixelSpacing" in ds
        assert str(ds.PatientName).startswith("SYNTHETIC^")
        syntaxes.add(str(ds.file_meta.TransferSyntaxUID))
        photometric.add(ds.PhotometricInterpretation)
    assert {pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless} & syntaxes
    assert pydicom.uid.ExplicitVRLittleEndian in syntaxes
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_right_knee_is_on_the_image_left(cohort_pair):
    first, _ = cohort_pair
    rows = read_manifest(first / "manifest.csv").rows
    centres: dict[str, dict[str, float]] = {}
    for row in rows:
        centres.setdefault(row.radiograph_path, {})[row.side] = row.keypoint_x
    assert all(c["RIGHT"] < c["LEFT"] for c in centres.values())


def test_medial_faces_the_image_centre(tmp_path):
    """Osteophyte-free geometry check on one rendered image: the fibular head (lateral) is on
    the outer side, so the bone mass just outside the plateau at the outer side is larger."""
    from mris.cohort import latent, maps, radiograph

    subject = latent.sample_subject(3, 0, 1, "test")
    states = {s: latent.knee_state(k, 0) for s, k in subject.knees.items()}
    jsw = {}
    for side, knee in subject.knees.items():
        pair = maps.thickness_maps(knee, states[side], 64)
        jsw[side] = maps.joint_space_mm(knee, states[side], pair.central_mm)
    rng = np.random.default_rng(0)
    pos = radiograph.sample_positioning(rng)
    image = radiograph.render_radiograph(subject.knees, states, jsw, pos, 1.0, rng).pixels.astype(
        float
    )
    for side, sign in (("RIGHT", -1), ("LEFT", 1)):
        x, y = (int(round(v)) for v in image_centre(pos, side))
        below = image[y + 25 : y + 40]  # fibular head level, 25-40 mm below the joint
        outer_cols = sorted((x + sign * 38, x + sign * 48))
        inner_cols = sorted((x - sign * 38, x - sign * 48))
        outer = below[:, outer_cols[0] : outer_cols[1]].mean()
        inner = below[:, inner_cols[0] : inner_cols[1]].mean()
        assert outer > inner, side


def image_centre(pos, side):
    return pos.centres_mm[side]  # spacing 1.0 mm: mm == px


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "mris.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_refuses_non_empty_out_without_force(tmp_path):
    (tmp_path / "something.txt").write_text("keep me")
    result = _run_cli("cohort", "--out", str(tmp_path), "--subjects", "2")
    assert result.returncode != 0
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert not (tmp_path / "manifest.csv").exists()


def test_cli_force_writes_and_summarises(tmp_path):
    (tmp_path / "something.txt").write_text("old")
    result = _run_cli(
        "cohort", "--out", str(tmp_path), "--subjects", "2", "--workers", "1", "--force"
    )
    assert result.returncode == 0, result.stderr
    assert "baseline KL0" in result.stdout and (tmp_path / "manifest.csv").is_file()


def test_cli_unwritable_out_is_a_clear_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        parent = locked
        if os.access(locked, os.W_OK):
            # root writes through file modes; a read-only file system (sysfs) still refuses
            parent = Path("/sys")
            assert parent.is_dir()
        result = _run_cli("cohort", "--out", str(parent / "mris-cohort-test"), "--subjects", "2")
        assert result.returncode != 0
        assert "error" in result.stderr.lower() and "Traceback" not in result.stderr
    finally:
        locked.chmod(0o700)


def test_cli_rejects_unknown_image_size(tmp_path):
    result = _run_cli("cohort", "--out", str(tmp_path / "x"), "--image-size", "huge")
    assert result.returncode != 0 and "image-size" in (result.stderr + result.stdout)


def test_eval_preset_has_a_large_test_split_at_encoder_resolution(tmp_path):
    """--preset eval: at least 500 test knees at the first visit (every knee is seen at month 0,
    both knees of a subject) and radiographs at least as fine as a 128 px encoder input."""
    from mris.cohort.generate import PRESETS
    from mris.cohort.latent import assign_splits
    from mris.constants import PreprocessConfig

    preset = PRESETS["eval"]
    assert 2 * assign_splits(preset.subjects, seed=7).count("test") >= 500
    result = _run_cli(
        "cohort", "--out", str(tmp_path), "--preset", "eval", "--subjects", "2", "--workers", "1"
    )
    assert result.returncode == 0, result.stderr
    encoder_mm_per_px = PreprocessConfig().roi_size_mm / 128
    for row in read_manifest(tmp_path / "manifest.csv").rows:
        assert float(row.extra["spacing_mm"]) <= encoder_mm_per_px
    assert "knees at the first visit" in result.stdout


def test_cli_rejects_unknown_preset(tmp_path):
    result = _run_cli("cohort", "--out", str(tmp_path / "x"), "--preset", "huge")
    assert result.returncode != 0 and "preset" in (result.stderr + result.stdout)
