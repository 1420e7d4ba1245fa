"""Turn pipeline results into HTTP answers: JSON (base64 float32 maps), NPZ, PNG or DICOM (a zip
of the Secondary Capture and the Structured Report of ``mris.dicom_out``)."""

from __future__ import annotations

import base64
import io
import json
import zipfile
from collections.abc import Mapping

import numpy as np
from fastapi.responses import Response

from mris.dicom import SourceIdentity
from mris.pipeline import KneeResult

NPZ_MEDIA_TYPE = "application/x-npz"
ZIP_MEDIA_TYPE = "application/zip"
DICOM_ZIP_NAMES = ("synthesized-maps-sc.dcm", "synthesized-maps-sr.dcm")
"""The two members of ``format=dicom``'s zip: the Secondary Capture, then the SR."""
SYNTHESIS_NEIGHBOUR_FIELDS = ("visit_month", "klg")
"""The database metadata a /synthesize neighbour carries beside its id, similarity and weight."""


def b64_float32(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def roi_info(result: KneeResult) -> dict:
    roi = result.roi
    return {
        "centre_xy": [float(roi.centre_xy[0]), float(roi.centre_xy[1])],
        "size_px": float(roi.size_px),
        "spacing_mm": float(roi.spacing_mm),
        "spacing_source": result.spacing_source,
        "source": roi.source,
        "confidence": result.confidence,
    }


def _knee(result: KneeResult, with_maps: bool, coverage: float | None = None) -> dict:
    """One knee's answer: /synthesize gives weights and maps, /retrieve the row metadata."""

    def neighbour(n) -> dict:
        if not with_maps:
            return {"id": n.pair_id, "similarity": n.similarity, **n.metadata}
        # /synthesize: the weight, and the visit and KL grade the viewer shows (the subject id
        # stays with /retrieve and /neighbours, which are asked for it).
        visit = {key: n.metadata[key] for key in SYNTHESIS_NEIGHBOUR_FIELDS if key in n.metadata}
        return {"id": n.pair_id, "similarity": n.similarity, "weight": n.weight, **visit}

    knee = {
        "side": result.side,
        "roi": roi_info(result),
        "neighbours": {
            region: [neighbour(n) for n in found] for region, found in result.neighbours.items()
        },
    }
    if with_maps:
        knee["maps"] = {
            name: {
                "shape": list(thickness.shape),
                "unit": "mm",
                "dtype": "float32-le",
                "data": b64_float32(thickness),
                "std": b64_float32(result.std_mm[name]),
                **(
                    {
                        "lower": b64_float32(result.lower_mm[name]),
                        "upper": b64_float32(result.upper_mm[name]),
                    }
                    if name in result.lower_mm
                    else {}
                ),
            }
            for name, thickness in result.maps_mm.items()
        }
        knee["uncertainty"] = uncertainty_info(result, coverage)
    return knee


RAW_SD_NOTE = (
    "this index bundle has no calibration: std is the neighbours' weighted standard deviation, "
    "with no stated coverage (mris index calibrate adds one)"
)


def uncertainty_info(result: KneeResult, coverage: float | None) -> dict:
    """What the knee's uncertainty maps mean (``schemas.Uncertainty``)."""
    if not result.lower_mm:
        return {"kind": "raw-sd", "note": RAW_SD_NOTE}
    return {
        "kind": "calibrated-interval",
        "coverage": coverage,
        "group": result.calibration_group,
        "reliability_mm": result.reliability_mm,
        "note": f"each cartilage pixel's true thickness lies in [lower, upper] with probability "
        f"{coverage:g} for knees of the population the index's calibration knees came from",
    }


def synthesis_payload(
    results: list[KneeResult],
    index_version: str,
    variant: str,
    k: int,
    nan_rule: str,
    coverage: float | None = None,
) -> dict:
    """The /synthesize answer; ``coverage``: the served calibration's (None without one)."""
    knees = [_knee(result, with_maps=True, coverage=coverage) for result in results]
    return {
        "index_version": index_version,
        "variant": variant,
        "k": k,
        "nan_rule": nan_rule,
        "knees": knees,
    }


def retrieval_payload(results: list[KneeResult], index_version: str, variant: str, k: int) -> dict:
    knees = [_knee(result, with_maps=False) for result in results]
    return {"index_version": index_version, "variant": variant, "k": k, "knees": knees}


def npz_response(results: list[KneeResult], payload: dict) -> Response:
    """Arrays ``<side>_<fc|tc>``, ``<side>_<fc|tc>_std`` and, when calibrated,
    ``<side>_<fc|tc>_lower`` / ``_upper`` (float32, mm) plus ``meta`` (the JSON answer without
    the base64 maps, as a UTF-8 string)."""
    arrays: dict[str, np.ndarray] = {}
    for result in results:
        for name, thickness in result.maps_mm.items():
            arrays[f"{result.side.lower()}_{name}"] = thickness.astype(np.float32)
            arrays[f"{result.side.lower()}_{name}_std"] = result.std_mm[name].astype(np.float32)
            if name in result.lower_mm:
                for bound, maps in (("lower", result.lower_mm), ("upper", result.upper_mm)):
                    arrays[f"{result.side.lower()}_{name}_{bound}"] = maps[name].astype(np.float32)
    meta = json.loads(json.dumps(payload))
    for knee in meta["knees"]:
        knee.pop("maps", None)
    arrays["meta"] = np.array(json.dumps(meta))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return Response(buffer.getvalue(), media_type=NPZ_MEDIA_TYPE)


def json_response(payload: dict) -> Response:
    """Serialised once, in a worker thread (maps travel as base64, so the body stays compact)."""
    body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type="application/json")


def dicom_zip_response(
    results: list[KneeResult],
    source: SourceIdentity | None,
    versions: Mapping[str, str],
    k: int,
    coverage: float | None = None,
) -> Response:
    """``format=dicom``: a zip (``DICOM_ZIP_NAMES``) of the Secondary Capture and the TID 1500
    SR of ``mris.dicom_out.results_to_dicom``, in the source's study. A zip rather than
    multipart/related: ``curl -o`` and every language's standard library open it; the DICOMweb
    router stores the same two objects with STOW-RS."""
    from pydicom.filewriter import dcmwrite

    from mris.dicom_out import results_to_dicom

    objects = results_to_dicom(results, source, versions=versions, k=k, coverage=coverage)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, dataset in zip(DICOM_ZIP_NAMES, objects):
            member = io.BytesIO()
            dcmwrite(member, dataset, enforce_file_format=True)
            archive.writestr(name, member.getvalue())
    return Response(
        buffer.getvalue(),
        media_type=ZIP_MEDIA_TYPE,
        headers={"Content-Disposition": 'attachment; filename="synthesized-maps-dicom.zip"'},
    )
