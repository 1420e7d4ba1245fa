"""Synthesis results as DICOM: a Secondary Capture of the maps and a Structured Report of the
numbers, built with highdicom constructors (pydicom underneath).

One request (one radiograph, one or two knees) gives one of each:

- Secondary Capture (``SCImage``, RGB, 8 bit): the figure of ``mris.render.results_figure``,
  one row per knee (ROI as the encoder saw it, FC and TC synthesized thickness with a colour bar
  in mm, their uncertainty and, when the index bundle is calibrated, the calibrated interval's
  lower and upper bound maps with its coverage and the knee's mean interval width), with the
  burned-in lines ``BURNED_IN_TEXT`` and the k, model and index versions (``BurnedInAnnotation``
  YES). No patient identifier is drawn. Body Part
  Examined KNEE; Laterality R or L when it shows one knee, empty for both (Type 2C, its values
  are R and L only).
- Comprehensive SR (TID 1500 measurement report): per knee and cartilage one measurement group
  (finding site: distal femur or tibia with the knee's laterality) holding the mean synthesized
  thickness overall and per medial / lateral compartment, the mean uncertainty (eq. 4's
  weighted standard deviation) and the neighbours' count, with the algorithm's identification
  (name ``MRIS``, version: the model and index versions) and the source radiograph referenced.
  When the index bundle is calibrated (``mris.calibration``), each group also holds the mean
  lower and mean upper bound of the calibrated interval (``knee_interval_numbers``), their
  concept names stating the coverage ("... of calibrated 90 % thickness interval"); without a
  calibration nothing more.

Medial / lateral: the maps are in atlas space, both sides alike (``mris.cohort.maps``,
docs/PREPROCESSING.md "Flip": RIGHT knees are flipped so medial lies where it lies in a LEFT
knee), columns running medial -> lateral. The MEDIAL compartment is columns ``[0, W // 2)``, the
LATERAL compartment columns ``[W // 2, W)`` of a map ``W`` columns wide, for a RIGHT and a LEFT
knee alike (the cohort's own split, atlas u < 0, is the same columns for even ``W``; an odd
``W``'s middle column, u = 0, is lateral there and here). Means are over the cartilage cells
(NaN outside cartilage ignored); a mean over no cartilage cell is left out of the report.

Identity: both objects copy the source's patient and General Study attributes from
``mris.dicom.SourceIdentity`` (never from the pixels' metadata, never logged), join the source's
study and reference the source image (its SOP Class and Instance UIDs) when it is known. Each
object is in a new series of its own (a series has one modality: OT for the SC, SR for the SR)
with new SOP Instance UIDs. Without a source identity (pixels from no DICOM file), or without
a StudyInstanceUID in it, both objects are put in a NEW study (one new StudyInstanceUID, study
date and time now) and reference no source image; their patient attributes are then empty.
"""

from __future__ import annotations

import datetime
import logging
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mris import __version__
from mris.constants import CARTILAGES
from mris.errors import BadParameter

if TYPE_CHECKING:  # pragma: no cover
    from pydicom.dataset import Dataset

    from mris.dicom import SourceIdentity
    from mris.pipeline import KneeResult

log = logging.getLogger(__name__)

BURNED_IN_TEXT = "Synthesized from radiograph - research use only"
MANUFACTURER = "MRIS"
ALGORITHM_NAME = "MRIS"
SC_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902
SC_SERIES_DESCRIPTION = "MRIS synthesized cartilage thickness maps"
SR_SERIES_DESCRIPTION = "MRIS synthesized cartilage thickness report"
SC_DPI = 90

# Concepts with no standard code: a private coding scheme ("99" prefix, PS3.16 8.2).
CODING_SCHEME = "99MRIS"
_THICKNESS = ("MRIS001", "Synthesized cartilage thickness")
_UNCERTAINTY = ("MRIS002", "Synthesized cartilage thickness uncertainty (weighted SD)")
_NEIGHBOURS = ("MRIS003", "Retrieved neighbours")
_METHOD = ("MRIS004", "Retrieval-based synthesis from radiograph (eq. 4)")
# The calibrated interval's bounds: a code per bound and coverage (MRIS005C90 = the lower bound
# of the 90 % interval): one code value, one meaning, as DICOM codes must have.
_INTERVAL_LOWER = ("MRIS005", "Lower bound of calibrated {interval}")
_INTERVAL_UPPER = ("MRIS006", "Upper bound of calibrated {interval}")

# Source identity -> the highdicom argument that copies it (both constructors).
_PATIENT_STUDY_ARGUMENTS = {
    "patient_id": "patient_id",
    "patient_name": "patient_name",
    "patient_birth_date": "patient_birth_date",
    "patient_sex": "patient_sex",
    "accession_number": "accession_number",
    "study_id": "study_id",
    "study_date": "study_date",
    "study_time": "study_time",
    "referring_physician_name": "referring_physician_name",
}
_PATIENT_SEX = ("M", "F", "O")  # highdicom refuses other values: those are left empty
_DATE_TIME_VR = {"patient_birth_date": "DA", "study_date": "DA", "study_time": "TM"}


def compartment_columns(width: int) -> dict[str, slice]:
    """The columns of each compartment of an atlas map ``width`` columns wide (both sides
    alike): ``{"medial": [0, width // 2), "lateral": [width // 2, width)}``."""
    return {"medial": slice(0, width // 2), "lateral": slice(width // 2, width)}


def compartment_means(atlas_map: np.ndarray) -> dict[str, float]:
    """``{"mean", "medial", "lateral"}``: the mean of an atlas map's finite cells overall and per
    compartment (``compartment_columns``), NaN where a part has none."""
    values = np.asarray(atlas_map, dtype=np.float64)
    columns = compartment_columns(values.shape[1])
    return {
        "mean": _nanmean(values),
        "medial": _nanmean(values[:, columns["medial"]]),
        "lateral": _nanmean(values[:, columns["lateral"]]),
    }


def knee_numbers(result: KneeResult) -> dict[str, dict[str, float | int]]:
    """The numbers the SR reports for one knee: cartilage -> ``mean_mm``, ``medial_mm``,
    ``lateral_mm``, ``std_mean_mm`` (float mm, NaN where no cartilage cell) and ``neighbours``
    (int). Raises ``BadParameter`` for a result made without maps."""
    if not result.maps_mm:
        raise BadParameter("a DICOM result needs the synthesized maps (with_maps)")
    numbers: dict[str, dict[str, float | int]] = {}
    for name in CARTILAGES:
        if name not in result.maps_mm:
            continue
        thickness = compartment_means(result.maps_mm[name])
        numbers[name] = {
            "mean_mm": thickness["mean"],
            "medial_mm": thickness["medial"],
            "lateral_mm": thickness["lateral"],
            "std_mean_mm": _nanmean(np.asarray(result.std_mm[name], dtype=np.float64)),
            "neighbours": _neighbour_count(result, name),
        }
    return numbers


def knee_interval_numbers(result: KneeResult) -> dict[str, dict[str, float]]:
    """The calibrated interval numbers the SR reports for one knee: cartilage ->
    ``lower_mean_mm``, ``upper_mean_mm`` (the means of the bound maps over the cartilage cells,
    float mm, NaN where none); empty when the result has no intervals (no calibration)."""
    return {
        name: {
            "lower_mean_mm": _nanmean(np.asarray(result.lower_mm[name], dtype=np.float64)),
            "upper_mean_mm": _nanmean(np.asarray(result.upper_mm[name], dtype=np.float64)),
        }
        for name in CARTILAGES
        if name in result.lower_mm and name in result.upper_mm and name in result.maps_mm
    }


def interval_concept(bound: str, coverage: float | None) -> tuple[str, str]:
    """The SR concept (code value, meaning) of an interval bound (``lower`` / ``upper``) at
    ``coverage``: ("MRIS005C90", "Lower bound of calibrated 90 % thickness interval")."""
    interval = "thickness interval"
    pattern = _INTERVAL_LOWER if bound == "lower" else _INTERVAL_UPPER
    value = pattern[0]
    if coverage is not None:
        interval = f"{coverage * 100:g} % {interval}"
        value = f"{value}C{coverage * 100:g}".replace(".", "P")
    return value, pattern[1].format(interval=interval)


@dataclass(frozen=True, repr=False)
class ResultUids:
    """The series and SOP instance UIDs of one request's SC and SR.

    ``new()``: fresh UIDs (the service, ``mris synthesize``). ``derived(source_uid, versions)``:
    the same UIDs every time for the same source image and the same model and index versions
    (a name-based UUID of those, as a ``2.25.`` UID, PS3.5 B.2), so a result that
    was already stored is recognised by its UID and a second store is a duplicate the PACS keeps
    once (``mris.pacs``: idempotent routing). Derived UIDs reveal nothing of the source UID."""

    sc_series: str
    sc_instance: str
    sr_series: str
    sr_instance: str

    @classmethod
    def new(cls) -> ResultUids:
        from pydicom.uid import generate_uid

        return cls(*(generate_uid(prefix=None) for _ in range(4)))

    @classmethod
    def derived(cls, source_sop_instance_uid: str, versions: Mapping[str, str]) -> ResultUids:
        made_by = "\n".join(f"{key}={value}" for key, value in sorted(versions.items()))
        return cls(
            *(
                _name_based_uid(f"{source_sop_instance_uid}\n{made_by}\n{role}")
                for role in ("sc-series", "sc-instance", "sr-series", "sr-instance")
            )
        )

    def __repr__(self) -> str:
        return "ResultUids(<4 UIDs>)"


# A fixed namespace for ``uuid.uuid5``: the same name gives the same UID on every machine.
_UID_NAMESPACE = uuid.UUID("6d2f7c1e-3b0a-5b8e-9c4d-2f6a1e0b7c93")


def _name_based_uid(name: str) -> str:
    """``2.25.<the UUID as a decimal integer>`` of a name-based (SHA-1) UUID (PS3.5 B.2)."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def results_to_dicom(
    results: Sequence[KneeResult],
    source: SourceIdentity | None,
    *,
    versions: Mapping[str, str],
    k: int,
    uids: ResultUids | None = None,
    coverage: float | None = None,
) -> tuple[Dataset, Dataset]:
    """One request's results as (Secondary Capture, Comprehensive SR), both highdicom datasets
    ready for ``save_as`` / ``dcmwrite``.

    ``results``: the knees of one request (``Pipeline.assemble`` / ``run`` with maps), one SC row
    and one SR group per cartilage each. ``source``: ``Prepared.source`` / ``Radiograph.source``
    (None: a new study, see the module docstring). ``versions``: what made the maps, e.g.
    ``{"model": ..., "index": ...}``, burned into the SC and the SR's algorithm version. ``k``:
    the neighbours asked. ``uids``: the objects' series and instance UIDs (default
    ``ResultUids.new()``). ``coverage``: the stated coverage of the results' calibrated intervals
    (``Pipeline.coverage``; None without a calibration), drawn in the SC and named in the SR's
    interval concepts. Raises ``BadParameter`` for no results or results without maps."""
    if not results:
        raise BadParameter("a DICOM result needs at least one knee")
    numbers = [knee_numbers(result) for result in results]
    intervals = [knee_interval_numbers(result) for result in results]
    version_text = "; ".join(f"{key} {value}" for key, value in versions.items()) or "unknown"
    identity = _identity_arguments(source)
    referenced = _referenced_source(source, identity["study_instance_uid"])
    uids = uids or ResultUids.new()
    with warnings.catch_warnings():
        # highdicom's and pydicom's warnings quote the value they warn about (a patient's
        # name that is not in DICOM's form, a text too long for its VR): never shown.
        warnings.simplefilter("ignore")
        sc = _secondary_capture(results, identity, referenced, version_text, k, uids, coverage)
        sr = _structured_report(
            results,
            numbers,
            intervals,
            coverage,
            identity,
            referenced,
            sc,
            version_text,
            k,
            uids,
        )
    log.info(
        "results as DICOM: %d knee(s), k=%d, source %s",
        len(results),
        k,
        "referenced" if referenced is not None else "unknown (new study)",
    )
    return sc, sr


# ----------------------------------------------------------------------------- identity


def _identity_arguments(source: SourceIdentity | None) -> dict[str, Any]:
    """highdicom's patient and study arguments from the source; a new study without one."""
    arguments: dict[str, Any] = {name: None for name in _PATIENT_STUDY_ARGUMENTS.values()}
    study_uid = source.study_instance_uid if source is not None else None
    if source is not None:
        for field_name, argument in _PATIENT_STUDY_ARGUMENTS.items():
            arguments[argument] = getattr(source, field_name)
        # Values highdicom or pydicom would refuse (and name in the error) are left empty.
        if arguments["patient_sex"] not in _PATIENT_SEX:
            arguments["patient_sex"] = None
        for argument, vr in _DATE_TIME_VR.items():
            arguments[argument] = _conforming(arguments[argument], vr)
    if study_uid is None:
        import highdicom as hd

        now = datetime.datetime.now()
        study_uid = str(hd.UID())
        arguments["study_date"] = now.strftime("%Y%m%d")
        arguments["study_time"] = now.strftime("%H%M%S")
        arguments["study_id"] = arguments["accession_number"] = None
    arguments["study_instance_uid"] = study_uid
    if source is not None and source.specific_character_set is not None:
        arguments["specific_character_set"] = source.specific_character_set.split("\\")
    return arguments


def _conforming(value: str | None, vr: str) -> str | None:
    """``value`` when pydicom reads it as a ``vr`` (DA, TM), else None (never an error)."""
    from pydicom.valuerep import DA, TM

    if value is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = (DA if vr == "DA" else TM)(value)
    except Exception:  # noqa: BLE001 - a malformed source date leaves the attribute empty
        return None
    return value if parsed is not None else None


def _referenced_source(source: SourceIdentity | None, study_uid: str | None) -> Dataset | None:
    """The source image as SR evidence (what highdicom's SR reads from an evidence dataset):
    None unless its SOP Class, SOP Instance, Series and Study UIDs are all known and the study
    is the one the results join."""
    from pydicom.dataset import Dataset

    if source is None or study_uid != source.study_instance_uid:
        return None
    uids = (source.sop_class_uid, source.sop_instance_uid, source.series_instance_uid)
    if any(uid is None for uid in uids):
        return None
    evidence = Dataset()
    evidence.SOPClassUID, evidence.SOPInstanceUID, evidence.SeriesInstanceUID = uids
    evidence.StudyInstanceUID = study_uid
    return evidence


def _study_arguments(identity: Mapping[str, object]) -> dict[str, object]:
    return {key: value for key, value in identity.items() if value is not None}


# ----------------------------------------------------------------------------- SC


def _secondary_capture(
    results: Sequence[KneeResult],
    identity: Mapping[str, object],
    referenced: Dataset | None,
    version_text: str,
    k: int,
    uids: ResultUids,
    coverage: float | None,
) -> Dataset:
    import highdicom as hd
    from pydicom.dataset import Dataset

    pixels = _figure_pixels(results, version_text, k, coverage)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # A montage of figure panels has no patient orientation; highdicom asks for one with
        # coordinate system PATIENT, so it is emptied below (Type 2C, may be empty).
        patient_orientation=("L", "F"),
        series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uids.sc_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=SC_SERIES_DESCRIPTION,
        software_versions=f"mris {__version__}",
        **_study_arguments(identity),
    )
    # What SCImage has no argument for (General Image module, PS3.3 C.7.6.1).
    sc.PatientOrientation = None
    # General Series: the knees shown. Laterality is Type 2C (a paired body part): R or L for
    # one knee, empty for both (its values are R and L only).
    sc.BodyPartExamined = "KNEE"
    sides = {result.side for result in results}
    sc.Laterality = {"RIGHT": "R", "LEFT": "L"}[sides.pop()] if len(sides) == 1 else None
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = f"{BURNED_IN_TEXT}; k {k}; {version_text}"[:1024]
    if referenced is not None:
        item = Dataset()
        item.ReferencedSOPClassUID = referenced.SOPClassUID
        item.ReferencedSOPInstanceUID = referenced.SOPInstanceUID
        sc.SourceImageSequence = [item]
    return sc


def _figure_pixels(
    results: Sequence[KneeResult], version_text: str, k: int, coverage: float | None
) -> np.ndarray:
    """uint8 (rows, cols, 3): ``mris.render``'s figure with the burned-in lines on top."""
    from mris.render import results_figure

    figure = results_figure(results, dpi=SC_DPI, coverage=coverage)
    figure.suptitle(f"{BURNED_IN_TEXT}\nk {k}; {version_text}", fontsize=9)
    canvas = figure.canvas
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


# ----------------------------------------------------------------------------- SR


def _structured_report(
    results: Sequence[KneeResult],
    numbers: Sequence[Mapping[str, Mapping[str, float | int]]],
    intervals: Sequence[Mapping[str, Mapping[str, float]]],
    coverage: float | None,
    identity: Mapping[str, object],
    referenced: Dataset | None,
    sc: Dataset,
    version_text: str,
    k: int,
    uids: ResultUids,
) -> Dataset:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(
        name=ALGORITHM_NAME, version=version_text, parameters=[f"k={k}"]
    )
    source_images = []
    if referenced is not None:
        source_images = [
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=referenced.SOPClassUID,
                referenced_sop_instance_uid=referenced.SOPInstanceUID,
            )
        ]
    groups = []
    for result, knee, knee_intervals in zip(results, numbers, intervals):
        laterality = codes.SCT.Right if result.side == "RIGHT" else codes.SCT.Left
        for name, values in knee.items():
            groups.append(
                _measurement_group(
                    result.side,
                    name,
                    values,
                    knee_intervals.get(name),
                    coverage,
                    laterality,
                    algorithm,
                    source_images,
                )
            )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.DCM.RadiographicImaging,
        imaging_measurements=groups,
    )
    # The SC carries the patient and study attributes (evidence[0] is what highdicom copies);
    # the source radiograph, when known, is evidence the measurement groups reference.
    evidence = [sc] + ([referenced] if referenced is not None else [])
    kwargs = {}
    if "specific_character_set" in identity:
        kwargs["specific_character_set"] = identity["specific_character_set"]
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sr_instance,
        instance_number=1,
        manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION,
        software_versions=f"mris {__version__}",
        **kwargs,
    )


def _measurement_group(
    side: str,
    cartilage: str,
    values: Mapping[str, float | int],
    interval: Mapping[str, float] | None,
    coverage: float | None,
    laterality,
    algorithm,
    source_images: list,
):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    def code(pair: tuple[str, str]):
        return hd.sr.CodedConcept(value=pair[0], scheme_designator=CODING_SCHEME, meaning=pair[1])

    bone = codes.SCT.DistalFemur if cartilage == "fc" else codes.SCT.Tibia
    site = hd.sr.FindingSite(anatomic_location=bone, laterality=laterality)
    mm = codes.UCUM.Millimeter
    measurements = []

    def add(name, value, unit, modifier=None, derivation=None) -> None:
        if not np.isfinite(value):  # no cartilage cell there: nothing to report
            return
        sites = None
        if modifier is not None:
            sites = [
                hd.sr.FindingSite(
                    anatomic_location=bone, laterality=laterality, topographical_modifier=modifier
                )
            ]
        measurements.append(
            hd.sr.Measurement(
                name=code(name),
                value=float(value),
                unit=unit,
                derivation=derivation,
                finding_sites=sites,
                algorithm_id=algorithm,
            )
        )

    add(_THICKNESS, values["mean_mm"], mm, derivation=codes.SCT.Mean)
    add(_THICKNESS, values["medial_mm"], mm, codes.SCT.Medial, codes.SCT.Mean)
    add(_THICKNESS, values["lateral_mm"], mm, codes.SCT.Lateral, codes.SCT.Mean)
    add(_UNCERTAINTY, values["std_mean_mm"], mm, derivation=codes.SCT.Mean)
    add(_NEIGHBOURS, values["neighbours"], codes.UCUM.NoUnits)
    if interval is not None:
        for bound in ("lower", "upper"):
            concept = interval_concept(bound, coverage)
            add(concept, interval[f"{bound}_mean_mm"], mm, derivation=codes.SCT.Mean)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"{side} knee {cartilage.upper()}"
        ),
        finding_type=codes.SCT.Cartilage,
        finding_sites=[site],
        method=code(_METHOD),
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=source_images or None,
    )


# ----------------------------------------------------------------------------- numbers


def _nanmean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _neighbour_count(result: KneeResult, cartilage: str) -> int:
    """The neighbours that made a cartilage's map: its own region's (variant ``separate``), or
    the one region's (variant ``combined``, both maps from the same neighbours)."""
    if cartilage in result.neighbours:
        return len(result.neighbours[cartilage])
    if len(result.neighbours) == 1:
        return len(next(iter(result.neighbours.values())))
    raise BadParameter(f"no neighbours recorded for the {cartilage} map")


__all__ = [
    "BURNED_IN_TEXT",
    "compartment_columns",
    "compartment_means",
    "interval_concept",
    "knee_interval_numbers",
    "knee_numbers",
    "results_to_dicom",
]
