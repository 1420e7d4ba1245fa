"""Pydantic models of the API's answers (they make the OpenAPI docs) and of its options."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class SynthesisParams(BaseModel):
    """Options of /synthesize and /retrieve (form fields with multipart, or query parameters)."""

    knees: Literal["both", "left", "right"] = "both"
    k: int = Field(20, ge=1, le=100)
    keypoints: str | None = Field(
        None,
        description='JSON {"left": [x, y], "right": [x, y]}: pixel column/row of the joint centres; '
        "`right` is the patient's right knee, on the image's left.",
        examples=['{"right": [812, 1180], "left": [2010, 1175]}'],
    )
    spacing_mm: float | None = Field(
        None, gt=0, le=5, description="Pixel spacing (mm) for files with no usable spacing tag."
    )
    format: Literal["json", "npz", "png"] = "json"


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


class KneeSynthesis(BaseModel):
    side: Literal["LEFT", "RIGHT"]
    roi: RoiInfo
    neighbours: dict[str, list[NeighbourOut]] = Field(description="Per region (fc, tc or combined).")
    maps: dict[str, MapOut] = Field(description="fc and tc maps in atlas space.")


class SynthesisResponse(BaseModel):
    index_version: str
    variant: str
    k: int
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
    type: str = "about:blank"
    title: str
    status: int
    detail: str
