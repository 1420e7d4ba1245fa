"""Results as DICOM (``mris.dicom_out``): the Secondary Capture and the Comprehensive SR of a
real request (the tiny real bundle, a DICOM with a planted identity), written to bytes and read
back with pydicom."""

from __future__ import annotations

import dataclasses
import io
import json
import logging

import numpy as np
import pydicom
import pytest
from conftest import PLANTED_IDENTITY, PLANTED_SECRETS, identity_dicom_bytes, require_binary
from pydicom import uid

from mris.calibration import Calibration
from mris.dicom import read_radiograph
from mris.dicom_out import (
    BURNED_IN_TEXT,
    ResultUids,
    compartment_columns,
    knee_interval_numbers,
    knee_numbers,
    results_to_dicom,
)
from mris.errors import BadParameter

K = 5
VERSIONS = {"model": "model-test-1", "index": "index-test-2"}
COPIED = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@pytest.fixture(scope="module")
def request_results(tmp_path_factory):
    """(results, source identity) of one two-knee request through ``Pipeline.run``."""
    from serve_process import tiny_bundle
    from test_service import KEYPOINTS

    from mris.pipeline import Pipeline, RequestOptions
    from mris.roi import parse_keypoints

    model, index = tiny_bundle(tmp_path_factory.mktemp("bundle"))
    pipeline = Pipeline.load(model, index, device="cpu", intra_op_threads=1)
    options = RequestOptions(keypoints=parse_keypoints(json.dumps(KEYPOINTS)), k=K)
    dicom = identity_dicom_bytes()
    results = pipeline.run(dicom, options)
    return results, read_radiograph(dicom).source


COVERAGE = 0.9
GROUP = "klg2"


def calibrated(results):
    """The results as a calibrated index bundle serves them: a real ``Calibration`` (the
    quantiles a fit could give) applied as ``Pipeline.assemble`` applies it."""
    calibration = Calibration(
        coverage=COVERAGE,
        sd_floor_mm=0.05,
        quantiles={"fc": {"all": 1.6, GROUP: 1.4}, "tc": {"all": 1.8}},
        method="test",
    )
    made = []
    for result in results:
        lower, upper = calibration.intervals(result.maps_mm, result.std_mm, GROUP)
        made.append(
            dataclasses.replace(result, lower_mm=lower, upper_mm=upper, calibration_group=GROUP)
        )
    return made


def _round_trip(ds) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _num_items(sequence, found=None):
    """Every NUM content item below ``sequence`` (depth first), with its parent's items."""
    found = [] if found is None else found
    for item in sequence:
        if item.get("ValueType") == "NUM":
            found.append(item)
        if "ContentSequence" in item:
            _num_items(item.ContentSequence, found)
    return found


def _groups(sr):
    """(tracking identifier text, group item) of each measurement group."""
    groups = []
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in item.ContentSequence:
            texts = [
                child.TextValue
                for child in group.ContentSequence
                if child.ValueType == "TEXT"
                and child.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"
            ]
            groups.append((texts[0], group))
    return groups


def _site_modifier(item) -> str | None:
    for child in item.get("ContentSequence", []):
        if child.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site":
            for grandchild in child.get("ContentSequence", []):
                if grandchild.ConceptNameCodeSequence[0].CodeMeaning == "Topographical modifier":
                    return grandchild.ConceptCodeSequence[0].CodeMeaning
    return None


def sr_numbers(sr) -> dict[tuple[str, str], dict[str, float]]:
    """The SR's numbers as ``mris.dicom_out.knee_numbers`` names them:
    (side, cartilage) -> {"mean_mm", "medial_mm", "lateral_mm", "std_mean_mm", "neighbours"}."""
    keys = {
        (_THICK, None): "mean_mm",
        (_THICK, "Medial"): "medial_mm",
        (_THICK, "Lateral"): "lateral_mm",
        (_SD, None): "std_mean_mm",
        (_COUNT, None): "neighbours",
    }
    numbers = {}
    for tracking, group in _groups(sr):
        side, _, cartilage = tracking.split(" ")
        values = {}
        for item in _num_items(group.ContentSequence):
            if item.ConceptNameCodeSequence[0].CodeValue[:7] in _INTERVAL_CODES:
                continue  # sr_interval_numbers
            key = keys[(item.ConceptNameCodeSequence[0].CodeMeaning, _site_modifier(item))]
            values[key] = float(item.MeasuredValueSequence[0].NumericValue)
        numbers[(side, cartilage.lower())] = values
    return numbers


def sr_interval_numbers(sr) -> dict[tuple[str, str], dict[str, tuple[float, str]]]:
    """The SR's interval numbers: (side, cartilage) -> {"lower_mean_mm" / "upper_mean_mm":
    (value, concept meaning)}; a group without them is left out."""
    numbers = {}
    for tracking, group in _groups(sr):
        side, _, cartilage = tracking.split(" ")
        values = {}
        for item in _num_items(group.ContentSequence):
            concept = item.ConceptNameCodeSequence[0]
            if concept.CodeValue[:7] in _INTERVAL_CODES:
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0]
                assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mm", "UCUM")
                assert concept.CodingSchemeDesignator == "99MRIS"
                key = _INTERVAL_CODES[concept.CodeValue[:7]]
                assert concept.CodeValue in ("MRIS005", "MRIS006", "MRIS005C90", "MRIS006C90")
                values[key] = (float(value.NumericValue), concept.CodeMeaning)
        if values:
            numbers[(side, cartilage.lower())] = values
    return numbers


def test_both_objects_copy_the_identity_in_new_series(request_results):
    results, source = request_results
    sc, sr = (_round_trip(ds) for ds in results_to_dicom(results, source, versions=VERSIONS, k=K))
    assert sc.SOPClassUID == uid.SecondaryCaptureImageStorage
    assert sr.SOPClassUID == uid.Comprehensive3DSRStorage
    for ds in (sc, sr):
        for keyword in COPIED:
            assert str(ds[keyword].value) == PLANTED_IDENTITY[keyword], keyword
        assert ds.SeriesInstanceUID != PLANTED_IDENTITY["SeriesInstanceUID"]
        assert ds.SOPInstanceUID != PLANTED_IDENTITY["SOPInstanceUID"]
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            assert uid.UID(ds[keyword].value).is_valid, keyword
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert sc.SeriesInstanceUID != sr.SeriesInstanceUID  # one modality per series
    assert sc.SOPInstanceUID != sr.SOPInstanceUID
    # The source image is referenced by both.
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.sop_instance_uid
    assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.sop_class_uid
    evidence = [
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert source.sop_instance_uid in evidence and sc.SOPInstanceUID in evidence


def test_derived_uids_are_the_same_for_the_same_source_and_versions(request_results):
    results, source = request_results
    uids = ResultUids.derived(source.sop_instance_uid, VERSIONS)
    assert uids == ResultUids.derived(source.sop_instance_uid, dict(reversed(VERSIONS.items())))
    assert uids != ResultUids.derived(source.sop_instance_uid, {**VERSIONS, "index": "other"})
    assert uids != ResultUids.derived("1.2.3", VERSIONS)
    values = dataclasses.astuple(uids)
    assert len(set(values)) == 4 and all(uid.UID(value).is_valid for value in values)
    assert source.sop_instance_uid not in repr(uids) and values[0] not in repr(uids)
    sc, sr = results_to_dicom(results, source, versions=VERSIONS, k=K, uids=uids)
    assert (sc.SeriesInstanceUID, sc.SOPInstanceUID) == (uids.sc_series, uids.sc_instance)
    assert (sr.SeriesInstanceUID, sr.SOPInstanceUID) == (uids.sr_series, uids.sr_instance)
    fresh = results_to_dicom(results, source, versions=VERSIONS, k=K)
    assert fresh[0].SOPInstanceUID != sc.SOPInstanceUID  # new UIDs unless asked for


# What dciodvfy may still warn about: our private coding scheme's designator (PS3.16 8.2 allows
# "99" schemes; dciodvfy knows only the standard ones) and the empty Laterality of an SC that
# shows both knees (Laterality's values are R and L only; empty is what Type 2 allows).
DCIODVFY_ALLOWED_WARNINGS = ("Unrecognized defined term <99MRIS>", "attribute <Laterality>")


@pytest.mark.parametrize(("knees", "with_intervals"), [(2, False), (1, False), (2, True)])
def test_dciodvfy_finds_no_error_in_either_object(request_results, tmp_path, knees, with_intervals):
    """David Clunie's DICOM validator (Debian's dicom3tools) checks both objects against the
    standard's IODs and modules (with a calibration's interval numbers too)."""
    import subprocess

    dciodvfy = require_binary("dciodvfy", "dicom3tools")
    results, source = request_results
    results = calibrated(results) if with_intervals else results
    objects = results_to_dicom(
        results[:knees],
        source,
        versions=VERSIONS,
        k=K,
        coverage=COVERAGE if with_intervals else None,
    )
    for name, ds in zip(("sc", "sr"), objects):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        lines = (report.stdout + report.stderr).splitlines()
        assert lines and lines[0] in ("SCImage", "Comprehensive3DSR"), lines[:3]
        problems = [
            line
            for line in lines[1:]
            if line.startswith(("Error", "Warning"))
            and not any(allowed in line for allowed in DCIODVFY_ALLOWED_WARNINGS)
        ]
        assert not [line for line in lines if line.startswith("Error")], (name, lines)
        assert not problems, (name, problems)


def test_secondary_capture_is_an_rgb_picture_with_burned_in_text(request_results):
    results, source = request_results
    sc, _ = results_to_dicom(results, source, versions=VERSIONS, k=K)
    sc = _round_trip(sc)
    pixels = sc.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
    assert (sc.Rows, sc.Columns) == pixels.shape[:2] and sc.SamplesPerPixel == 3
    assert sc.PhotometricInterpretation == "RGB" and sc.BurnedInAnnotation == "YES"
    assert BURNED_IN_TEXT in sc.DerivationDescription
    assert "model-test-1" in sc.DerivationDescription and "index-test-2" in sc.DerivationDescription
    assert pixels.std() > 10  # a picture, not a blank page
    # One row per knee: two knees are taller than one.
    one, _ = results_to_dicom(results[:1], source, versions=VERSIONS, k=K)
    assert one.Rows < sc.Rows


def test_report_numbers_equal_the_maps(request_results):
    results, source = request_results
    _, sr = results_to_dicom(results, source, versions=VERSIONS, k=K)
    sr = _round_trip(sr)
    groups = dict(_groups(sr))
    assert set(groups) == {f"{r.side} knee {name.upper()}" for r in results for name in r.maps_mm}
    for result in results:
        for name, thickness in result.maps_mm.items():
            group = groups[f"{result.side} knee {name.upper()}"]
            half = compartment_columns(thickness.shape[1])
            expected = {
                (_THICK, None): np.nanmean(thickness),
                (_THICK, "Medial"): np.nanmean(thickness[:, half["medial"]]),
                (_THICK, "Lateral"): np.nanmean(thickness[:, half["lateral"]]),
                (_SD, None): np.nanmean(result.std_mm[name]),
                (_COUNT, None): len(result.neighbours[name]),
            }
            found = {}
            for item in _num_items(group.ContentSequence):
                meaning = item.ConceptNameCodeSequence[0].CodeMeaning
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0]
                found[(meaning, _site_modifier(item))] = float(value.NumericValue)
                if meaning == _COUNT:
                    assert unit.CodeValue == "1"
                else:
                    assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("mm", "UCUM")
            assert set(found) == set(expected)
            for key, value in expected.items():
                assert found[key] == pytest.approx(float(value), abs=1e-3), key
            assert found[(_COUNT, None)] == K
    # The algorithm is identified in each group, with the model and index versions.
    for _, group in groups.items():
        texts = _texts(group.ContentSequence)
        assert texts["Algorithm Name"] == {"MRIS"}
        assert texts["Algorithm Version"] == {"model model-test-1; index index-test-2"}


def _texts(sequence, found=None) -> dict[str, set[str]]:
    """Concept name -> the TEXT values below ``sequence``."""
    found = {} if found is None else found
    for item in sequence:
        if item.get("ValueType") == "TEXT":
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            found.setdefault(name, set()).add(item.TextValue)
        if "ContentSequence" in item:
            _texts(item.ContentSequence, found)
    return found


def test_report_gives_the_interval_bounds_means_when_calibrated(request_results):
    results, source = request_results
    _, plain = results_to_dicom(results, source, versions=VERSIONS, k=K)
    assert sr_interval_numbers(_round_trip(plain)) == {}  # no calibration: nothing new
    assert all(knee_interval_numbers(result) == {} for result in results)

    bounded = calibrated(results)
    _, sr = results_to_dicom(bounded, source, versions=VERSIONS, k=K, coverage=COVERAGE)
    sr = _round_trip(sr)
    found = sr_interval_numbers(sr)
    assert set(found) == {(r.side, name) for r in bounded for name in r.maps_mm}
    for result in bounded:
        numbers = knee_interval_numbers(result)
        for name in result.maps_mm:
            values = found[(result.side, name)]
            for bound, maps in (("lower", result.lower_mm), ("upper", result.upper_mm)):
                value, meaning = values[f"{bound}_mean_mm"]
                assert value == pytest.approx(float(np.nanmean(maps[name])), abs=1e-3)
                assert numbers[name][f"{bound}_mean_mm"] == pytest.approx(value, abs=1e-3)
                assert (
                    meaning == f"{bound.capitalize()} bound of calibrated 90 % thickness interval"
                )
            assert values["lower_mean_mm"][0] < values["upper_mean_mm"][0]
    # The other numbers are the same as without a calibration.
    assert sr_numbers(sr) == sr_numbers(_round_trip(plain))


def test_secondary_capture_shows_the_bound_maps_when_calibrated(request_results):
    results, source = request_results
    plain, _ = results_to_dicom(results, source, versions=VERSIONS, k=K)
    bounded, _ = results_to_dicom(
        calibrated(results), source, versions=VERSIONS, k=K, coverage=COVERAGE
    )
    # Per knee a row per cartilage (map, SD, lower, upper) instead of one row.
    assert bounded.Rows > plain.Rows


_THICK = "Synthesized cartilage thickness"
_SD = "Synthesized cartilage thickness uncertainty (weighted SD)"
_COUNT = "Retrieved neighbours"
_INTERVAL_CODES = {"MRIS005": "lower_mean_mm", "MRIS006": "upper_mean_mm"}


def test_medial_is_the_left_half_of_the_atlas_grid_for_both_knees(request_results):
    results, _ = request_results
    for result in results:
        thickness = result.maps_mm["fc"].copy()
        width = thickness.shape[1]
        cartilage = np.isfinite(thickness)
        thickness[cartilage] = 1.0
        thickness[:, : width // 2][cartilage[:, : width // 2]] = 3.0  # medial thicker
        result_copy = dataclasses.replace(result, maps_mm={"fc": thickness})
        numbers = knee_numbers(result_copy)["fc"]
        assert numbers["medial_mm"] == pytest.approx(3.0)
        assert numbers["lateral_mm"] == pytest.approx(1.0)
    assert compartment_columns(32) == {"medial": slice(0, 16), "lateral": slice(16, 32)}
    assert compartment_columns(5) == {"medial": slice(0, 2), "lateral": slice(2, 5)}


def test_without_a_source_identity_a_new_study(request_results):
    results, _ = request_results
    sc, sr = (_round_trip(ds) for ds in results_to_dicom(results, None, versions=VERSIONS, k=K))
    assert sc.StudyInstanceUID == sr.StudyInstanceUID
    assert sc.StudyInstanceUID != PLANTED_IDENTITY["StudyInstanceUID"]
    assert uid.UID(sc.StudyInstanceUID).is_valid
    assert "SourceImageSequence" not in sc
    assert sc.PatientID == "" and sr.PatientID == ""
    assert len(sc.StudyDate) == 8


def test_results_without_maps_are_refused(request_results):
    results, source = request_results
    bare = [dataclasses.replace(r, maps_mm={}, std_mm={}) for r in results]
    with pytest.raises(BadParameter):
        results_to_dicom(bare, source, versions=VERSIONS, k=K)
    with pytest.raises(BadParameter):
        results_to_dicom([], source, versions=VERSIONS, k=K)


def test_no_identity_value_in_the_log(request_results, caplog, recwarn):
    results, source = request_results
    # A name not in DICOM's form and a too-long ID: highdicom and pydicom warn quoting them.
    odd = dataclasses.replace(source, patient_name="Oddname" * 12, study_id="STUDY-KNOWN-7" * 3)
    with caplog.at_level(logging.DEBUG):
        results_to_dicom(results, source, versions=VERSIONS, k=K)
        results_to_dicom(results, odd, versions=VERSIONS, k=K)
    ours = [record for record in caplog.records if record.name == "mris.dicom_out"]
    assert len(ours) == 2  # the module does log what it made
    logged = "\n".join(record.getMessage() for record in caplog.records)  # every logger
    logged += "\n".join(str(warning.message) for warning in recwarn)
    for secret in (*PLANTED_SECRETS, "Oddname"):
        assert secret not in logged


def test_malformed_source_dates_are_left_empty(request_results):
    results, source = request_results
    odd = dataclasses.replace(
        source, study_date="2024-01-15", study_time="10:11:12", patient_birth_date="1961/02/03"
    )
    for ds in results_to_dicom(results, odd, versions=VERSIONS, k=K):
        ds = _round_trip(ds)
        assert ds.StudyDate == "" and ds.StudyTime == "" and ds.PatientBirthDate == ""
        assert ds.PatientID == PLANTED_IDENTITY["PatientID"]


def test_combined_variant_counts_the_one_region(request_results):
    results, source = request_results
    combined = [
        dataclasses.replace(r, neighbours={"combined": r.neighbours["fc"][:3]}) for r in results
    ]
    for knee in (knee_numbers(r) for r in combined):
        assert knee["fc"]["neighbours"] == knee["tc"]["neighbours"] == 3
