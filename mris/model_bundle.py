"""The model bundle (DESIGN.md, Data contracts): a directory of ONNX files and ``card.json``.

Layout::

    MODEL_DIR/
      card.json
      separate-fc-radiograph.onnx   separate-fc-thickness.onnx
      separate-tc-radiograph.onnx   separate-tc-thickness.onnx
      combined-radiograph.onnx      combined-thickness.onnx
      localiser.onnx

A variant holds one or more *regions*; each region is one encoder pair and, later, one FAISS
index. ``separate`` has regions ``fc`` and ``tc`` (femoral neighbours synthesize the femoral
map, tibial the tibial); ``combined`` has one region ``combined`` whose thickness input is fc
stacked over tc (2S x S) and whose neighbours synthesize both maps.

Training writes the card (``write_model_card``); index building, serving and evaluation read it
with ``load_model_bundle``, which checks every file's sha256 so nothing runs on a bundle whose
files do not match its card, and refuses a card whose ``preprocessing_version`` is not this
code's ``PREPROCESSING_VERSION`` (``BundleMismatch``: retrain).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mris.constants import CARTILAGES, PreprocessConfig, check_preprocessing_version
from mris.errors import BundleInvalid
from mris.fsutil import atomic_write_json, sha256_file

MODEL_FORMAT = "mris-model/1"
VARIANTS = ("separate", "combined")
VARIANT_REGIONS = {"separate": CARTILAGES, "combined": ("combined",)}


class EncoderPair(BaseModel):
    """File names (relative to the bundle) of one region's two encoders and their input sizes."""

    radiograph: str
    thickness: str
    radiograph_input_px: tuple[int, int]  # rows, cols of the radiograph encoder input
    thickness_input_px: tuple[int, int]  # rows, cols of the thickness encoder input
    embedding_dim: int = 512


class VariantCard(BaseModel):
    regions: dict[str, EncoderPair]


class LocaliserCard(BaseModel):
    file: str
    input_px: tuple[int, int]  # rows, cols of the whole-radiograph input of the global stage
    details: dict[str, Any] = Field(default_factory=dict)


class ModelCard(BaseModel):
    format: str = MODEL_FORMAT
    created: str
    preprocess: dict[str, Any]
    # None on cards written before the version existed (ROI normalisation 1): refused on load.
    preprocessing_version: int | None = None
    variants: dict[str, VariantCard]
    localiser: LocaliserCard | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)  # file name -> sha256

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def encoder_sha256(self, variant: str, region: str, modality: str) -> str:
        pair = self.variants[variant].regions[region]
        return self.files[getattr(pair, modality)]


class ModelBundle:
    """A verified model bundle on disk."""

    def __init__(self, root: Path, card: ModelCard):
        self.root = root
        self.card = card

    def path(self, name: str) -> Path:
        return self.root / name

    def encoder_path(self, variant: str, region: str, modality: str) -> Path:
        """``modality`` is ``radiograph`` or ``thickness``."""
        if variant not in self.card.variants:
            raise BundleInvalid(
                f"model bundle {self.root} has no '{variant}' variant "
                f"(it has: {', '.join(sorted(self.card.variants))})"
            )
        pair = self.card.variants[variant].regions[region]
        return self.root / getattr(pair, modality)

    @property
    def localiser_path(self) -> Path | None:
        return None if self.card.localiser is None else self.root / self.card.localiser.file


def write_model_card(root: str | Path, card: ModelCard) -> Path:
    """Fill ``card.files`` with the sha256 of every file in the bundle (but the card) and write
    ``card.json`` atomically."""
    root = Path(root)
    card.files = {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "card.json" and not path.name.startswith(".tmp-")
    }
    return atomic_write_json(root / "card.json", card.model_dump(mode="json"))


def load_model_bundle(root: str | Path, verify: bool = True) -> ModelBundle:
    """Read ``card.json`` and (by default) check that every listed file exists with its sha256
    and that every encoder the card names is listed. Raises ``BundleInvalid``, or
    ``BundleMismatch`` when the card's ``preprocessing_version`` is not ``PREPROCESSING_VERSION``
    (a bundle trained on another ROI normalisation is never served)."""
    root = Path(root)
    card_path = root / "card.json"
    if not card_path.is_file():
        raise BundleInvalid(f"{root} is not a model bundle: card.json is missing")
    try:
        card = ModelCard.model_validate(json.loads(card_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise BundleInvalid(f"{card_path} is not a valid model card: {exc}") from exc
    if card.format != MODEL_FORMAT:
        raise BundleInvalid(
            f"{card_path}: unknown format {card.format!r} (expected {MODEL_FORMAT})"
        )
    check_preprocessing_version(
        card.preprocessing_version, f"model bundle {root}", "retrained (`mris train ...`)"
    )
    named = [
        getattr(pair, modality)
        for variant in card.variants.values()
        for pair in variant.regions.values()
        for modality in ("radiograph", "thickness")
    ]
    if card.localiser is not None:
        named.append(card.localiser.file)
    unlisted = [name for name in named if name not in card.files]
    if unlisted:
        raise BundleInvalid(f"model card in {root} names unlisted file(s): {', '.join(unlisted)}")
    if verify:
        for name, digest in card.files.items():
            path = root / name
            if not path.is_file():
                raise BundleInvalid(f"model bundle {root} is incomplete: {name} is missing")
            if sha256_file(path) != digest:
                raise BundleInvalid(
                    f"model bundle {root}: {name} does not match its sha256 in card.json"
                )
    return ModelBundle(root, card)
