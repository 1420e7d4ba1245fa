"""The index bundle's card and file layout (the role of autofaiss's ``external/metadata.py``):
what a version holds, read back and checked before anything is loaded.

Layout of one version (immutable once written; see ``mris.index.publish``)::

    <version>/
      card.json                 IndexCard (format, encoder sha256s, variant, counts, checksums...)
      rows.csv                  row metadata (``mris.index.rows``)
      embeddings-<region>.npy   float32 [rows, 512], L2-normalised (thickness encoder output)
      index-<region>.faiss      FAISS inner-product index over those embeddings, same row order
      maps-fc.npy, maps-tc.npy  float32 (or float16) [rows, H, W], mm, NaN outside cartilage

Regions are ``fc`` and ``tc`` (variant ``separate``) or ``combined``. Every region's index uses
the same row order, and the maps are stored once per cartilage: a ``separate`` bundle's ``fc``
neighbours synthesize ``maps-fc``, its ``tc`` neighbours ``maps-tc``; a ``combined`` bundle's
neighbours synthesize both (``RegionCard.maps``, ``REGION_MAPS``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mris.constants import CARTILAGES, check_preprocessing_version
from mris.errors import BundleInvalid, BundleMismatch
from mris.model_bundle import ModelCard

INDEX_FORMAT = "mris-index/1"
CARD_NAME = "card.json"
REGION_MAPS = {"fc": ["fc"], "tc": ["tc"], "combined": list(CARTILAGES)}


def embeddings_name(region: str) -> str:
    return f"embeddings-{region}.npy"


def index_name(region: str) -> str:
    return f"index-{region}.faiss"


def maps_name(cartilage: str) -> str:
    return f"maps-{cartilage}.npy"


class RegionCard(BaseModel):
    """One region: its encoders (by sha256), its index and how well it retrieves."""

    thickness_encoder: str
    thickness_encoder_sha256: str
    radiograph_encoder: str
    radiograph_encoder_sha256: str
    embeddings_file: str
    index_file: str
    maps: list[str]  # cartilages this region's neighbours synthesize
    kind: str  # flat | ivf | ivfpq
    factory: str
    nlist: int = 0
    nprobe: int = 0
    exact: bool = True
    recall_at_20: float = 1.0  # measured against exact search at build time
    recall_queries: int = 0
    recall_method: str = ""
    reason: str = ""


class MapsCard(BaseModel):
    file: str
    shape: tuple[int, int, int]  # rows, H, W
    dtype: str


class IndexCard(BaseModel):
    format: str = INDEX_FORMAT
    version: str
    created: str  # ISO UTC
    build_seconds: float
    variant: str
    rows: int
    embedding_dim: int
    preprocess: dict[str, Any]
    # None on cards written before the version existed (ROI normalisation 1): refused by read_card.
    preprocessing_version: int | None = None
    preprocess_fingerprint: str
    regions: dict[str, RegionCard]
    maps: dict[str, MapsCard]
    # manifest, splits, appended_from, skipped...
    source: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)  # faiss, onnxruntime, numpy, mris
    # mris.calibration.Calibration.summary() when the bundle holds calibration.json
    calibration: dict[str, Any] | None = None
    files: dict[str, str] = Field(default_factory=dict)  # name -> sha256
    sizes: dict[str, int] = Field(default_factory=dict)  # name -> bytes


def read_card(root: str | Path, *, check_preprocessing: bool = True) -> IndexCard:
    """The validated card of the bundle version at ``root``: ``BundleInvalid`` when missing or
    malformed, ``BundleMismatch`` when built with another ROI preprocessing version (rebuild it);
    ``check_preprocessing=False`` only for listing versions."""
    root = Path(root)
    path = root / CARD_NAME
    if not path.is_file():
        raise BundleInvalid(f"{root} is not an index bundle: {CARD_NAME} is missing")
    try:
        card = IndexCard.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise BundleInvalid(f"{path} is not a valid index card: {exc}") from exc
    if card.format != INDEX_FORMAT:
        raise BundleInvalid(f"{path}: unknown format {card.format!r} (expected {INDEX_FORMAT})")
    if check_preprocessing:
        check_preprocessing_version(
            card.preprocessing_version,
            f"index bundle {root}",
            "rebuilt with a current model bundle (`mris index build ...`)",
        )
    return card


def check_encoders(card: IndexCard, model_card: ModelCard) -> None:
    """Raise ``BundleMismatch`` unless ``model_card``'s encoders (both modalities, every region)
    and preprocessing are the ones the index was built with."""
    variant = model_card.variants.get(card.variant)
    if variant is None:
        raise BundleMismatch(
            f"index bundle {card.version} is variant '{card.variant}', "
            "the model bundle has no such variant"
        )
    problems = []
    for region, region_card in card.regions.items():
        if region not in variant.regions:
            problems.append(f"region {region} missing from the model")
            continue
        for modality in ("thickness", "radiograph"):
            have = model_card.encoder_sha256(card.variant, region, modality)
            want = getattr(region_card, f"{modality}_encoder_sha256")
            if have != want:
                problems.append(
                    f"{region} {modality} encoder sha256 {have[:12]} != index's {want[:12]}"
                )
    if model_card.preprocess != card.preprocess:
        problems.append("preprocessing constants differ")
    if problems:
        raise BundleMismatch(
            f"index bundle {card.version} was not built with these encoders: " + "; ".join(problems)
        )


def check_sizes(root: Path, card: IndexCard) -> None:
    """Every file the card lists is present with the size it records (cheap; full checksums are
    ``mris.index.verify``'s job): ``BundleInvalid`` otherwise."""
    for name, size in card.sizes.items():
        file = root / name
        if not file.is_file():
            raise BundleInvalid(f"index bundle {root} is incomplete: {name} is missing")
        if file.stat().st_size != size:
            raise BundleInvalid(
                f"index bundle {root}: {name} has {file.stat().st_size} bytes, card says {size}"
            )


__all__ = [
    "CARD_NAME",
    "INDEX_FORMAT",
    "REGION_MAPS",
    "IndexCard",
    "MapsCard",
    "RegionCard",
    "check_encoders",
    "check_sizes",
    "embeddings_name",
    "index_name",
    "maps_name",
    "read_card",
]
