"""Pydantic models of the API's answers (they make the OpenAPI docs) and of its options.

Decisions:

- The request options are ``mris.options.SynthesisOptions``, the one model the service, the CLI
  and the evaluation validate with; the OpenAPI query parameters and multipart fields are
  generated from its JSON schema (``option_parameters``, ``upload_openapi``), so the schema a
  client reads states the limits the service enforces, and they are the decoder's (spacing),
  the ROI parser's (keypoints) and the synthesis' (NaN rules). The /synthesize answer says
  which NaN rule made its maps (``nan_rule``).
- Error answers are documented as ``application/problem+json`` with a non-empty ``detail``
  (``problem_responses``), the media type they are sent with.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

from pydantic import BaseModel, Field

from mris.options import OPTION_NAMES, SynthesisOptions
from mris.service.problems import PROBLEM_MEDIA_TYPE
from mris.synthesis import NAN_RULES

DICOM_MEDIA_TYPES = ("application/dicom", "application/octet-stream")
BINARY_SCHEMA: dict[str, Any] = {"type": "string", "format": "binary"}


def option_schemas() -> dict[str, dict[str, Any]]:
    """JSON schema of each option as sent (no ``null``: an absent option is simply not sent)."""
    properties = SynthesisOptions.model_json_schema()["properties"]
    schemas = {}
    for name in OPTION_NAMES:
        schema = copy.deepcopy(properties[name])
        branches = [b for b in schema.pop("anyOf", []) if b.get("type") != "null"]
        if branches:
            schema.update(branches[0])
        if name == "k" or schema.get("default", 0) is None:
            schema.pop("default", None)  # k's default is the service's setting, not the model's
        schema.pop("title", None)
        schemas[name] = schema
    return schemas


def option_parameters() -> list[dict[str, Any]]:
    """The options as OpenAPI query parameters."""
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": schema.get("description", ""),
            "schema": {key: value for key, value in schema.items() if key != "description"},
        }
        for name, schema in option_schemas().items()
    ]


def upload_openapi() -> dict[str, Any]:
    """``openapi_extra`` of the upload routes: the query options and the two body forms."""
    return {
        "parameters": option_parameters(),
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {**BINARY_SCHEMA, "description": "The radiograph DICOM file."},
                            **option_schemas(),
                        },
                        "additionalProperties": False,
                    },
                    "encoding": {"file": {"contentType": DICOM_MEDIA_TYPES[0]}},
                },
                **{media_type: {"schema": BINARY_SCHEMA} for media_type in DICOM_MEDIA_TYPES},
            },
        },
    }


class RoiInfo(BaseModel):
    centre_xy: tuple[float, float] = Field(description="Joint centre, pixel column and row.")
    size_px: float = Field(description="ROI side in source pixels (140 mm / spacing).")
    spacing_mm: float
    spacing_source: str
    source: str = Field(description="Where the centre came from: caller or localiser.")
    confidence: float | None = None


class NeighbourOut(BaseModel):
    id: str = Field(description="pair_id of the database knee-visit.")
    similarity: float = Field(description="Cosine similarity of the radiograph and map embeddings.")
    weight: float = Field(description="Weight in the synthesis (eq. 4); absent from /retrieve.")
    visit_month: int | None = Field(None, description="The database knee-visit's visit month.")
    klg: int | None = Field(None, description="Kellgren-Lawrence grade, when the index has it.")


class RetrievedNeighbour(BaseModel):
    id: str
    similarity: float
    subject_id: str
    side: str
    visit_month: int
    klg: int | None = None


class MapOut(BaseModel):
    shape: tuple[int, int]
    unit: Literal["mm"] = "mm"
    dtype: Literal["float32-le"] = "float32-le"
    data: str = Field(description="base64 of the float32 little-endian map, NaN outside cartilage.")
    std: str = Field(description="base64 of the per-pixel weighted standard deviation (mm).")
    lower: str | None = Field(
        None,
        description="base64 of the calibrated interval's lower bound (mm), when the index "
        "bundle is calibrated (see the knee's uncertainty).",
    )
    upper: str | None = Field(
        None, description="base64 of the calibrated interval's upper bound (mm), likewise."
    )


class Uncertainty(BaseModel):
    kind: Literal["calibrated-interval", "raw-sd"] = Field(
        description="calibrated-interval: lower/upper hold the true thickness with probability "
        "`coverage` per cartilage pixel (split conformal, on knees of the population the "
        "database came from); raw-sd: the index bundle has no calibration, only the neighbours' "
        "weighted SD (no stated coverage)."
    )
    coverage: float | None = Field(None, description="The intervals' stated coverage.")
    group: str | None = Field(
        None, description="The knee's calibration group (neighbours' weighted KL grade)."
    )
    reliability_mm: float | None = Field(
        None,
        description="Mean interval width (upper - lower, mm) over the knee's cartilage pixels: "
        "smaller is more certain.",
    )
    note: str


class KneeSynthesis(BaseModel):
    side: Literal["LEFT", "RIGHT"]
    roi: RoiInfo
    neighbours: dict[str, list[NeighbourOut]] = Field(
        description="Per region (fc, tc or combined)."
    )
    maps: dict[str, MapOut] = Field(description="fc and tc maps in atlas space.")
    uncertainty: Uncertainty


class SynthesisResponse(BaseModel):
    index_version: str
    variant: str
    k: int
    nan_rule: Literal[NAN_RULES] = Field(  # type: ignore[valid-type]
        description="The NaN rule that made the maps (all or majority)."
    )
    knees: list[KneeSynthesis]


class KneeRetrieval(BaseModel):
    side: Literal["LEFT", "RIGHT"]
    roi: RoiInfo
    neighbours: dict[str, list[RetrievedNeighbour]]


class RetrievalResponse(BaseModel):
    index_version: str
    variant: str
    k: int
    knees: list[KneeRetrieval]


class Problem(BaseModel):
    """An error answer (RFC 9457), sent as application/problem+json."""

    type: str = "about:blank"
    title: str = Field(min_length=1)
    status: int = Field(ge=400, le=599)
    detail: str = Field(min_length=1, description="What was wrong, in plain words.")


def problem_responses(descriptions: dict[int, str]) -> dict[int, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses, as the handlers send them."""
    schema = Problem.model_json_schema()
    schema.pop("title", None)
    return {
        status: {"description": text, "content": {PROBLEM_MEDIA_TYPE: {"schema": schema}}}
        for status, text in descriptions.items()
    }
