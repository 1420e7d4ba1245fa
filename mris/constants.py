"""Preprocessing constants shared by training, index building and serving.

A model bundle's card stores ``PreprocessConfig.to_dict()``; everything downstream rebuilds the
config from the card, so nothing guesses a constant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from mris.errors import BundleMismatch

SIDES = ("LEFT", "RIGHT")
CARTILAGES = ("fc", "tc")
"""The two cartilage maps of a knee: femoral (fc) and tibial (tc), in this order."""
SPLITS = ("database", "downstream", "test")
VISIT_MONTHS = (0, 12, 24, 36, 48, 72, 96)

PREPROCESSING_VERSION = 2
"""Version of the ROI preprocessing (``mris.roi``) that model and index bundles record in their
cards. 2: the reference's ``normalize`` (subtract the ROI's minimum, then the 99th percentile of
the shifted ROI -> 0.99). 1 (cards without the field): divided by the 99th percentile only.
Encoders trained on one version do not serve inputs of another, so a bundle whose card records
another version (or none) is refused with ``BundleMismatch`` (``check_preprocessing_version``)."""


def check_preprocessing_version(version: int | None, what: str, rebuild: str) -> None:
    """Raise ``BundleMismatch`` unless ``version`` is ``PREPROCESSING_VERSION``; ``what`` names the
    bundle in the message, ``rebuild`` the command that makes a current one."""
    if version == PREPROCESSING_VERSION:
        return
    made = (
        "no preprocessing version (an older ROI normalisation)"
        if version is None
        else (
            f"preprocessing version {version}"
            + (" (an older ROI normalisation)" if version < PREPROCESSING_VERSION else "")
        )
    )
    raise BundleMismatch(
        f"{what} was made with {made}; this mris uses preprocessing version "
        f"{PREPROCESSING_VERSION} "
        f"(ROI minus its minimum, 99th percentile -> 0.99). It must be {rebuild}; it is "
        "never served "
        "with another normalisation"
    )


@dataclass(frozen=True)
class PreprocessConfig:
    """Every constant that turns a radiograph or a thickness map into an encoder input.

    - ``roi_size_mm``: side of the square knee ROI around the joint centre (mm).
    - ``encoder_px``: side of the encoder input (px); the combined variant's map input is
      ``2 * encoder_px`` rows by ``encoder_px`` columns (fc over tc).
    - ``intensity_percentile`` / ``intensity_target``: the ROI is scaled so this percentile of
      its pixels maps to this value (reference behaviour: 99 -> 0.99).
    - ``thickness_scale_mm``: thickness maps are divided by this (NaN -> 0 first).
    - ``flip_right``: RIGHT knee ROIs are flipped left-right so medial is on the same side as
      in a LEFT knee's ROI and in the shared atlas orientation of the maps.
    """

    roi_size_mm: float = 140.0
    encoder_px: int = 256
    intensity_percentile: float = 99.0
    intensity_target: float = 0.99
    thickness_scale_mm: float = 3.0
    flip_right: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing constants: {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Short stable hash of the constants (cache keys, card checks)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
