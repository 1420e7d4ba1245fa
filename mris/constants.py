"""Preprocessing constants shared by training, index building and serving.

A model bundle's card stores ``PreprocessConfig.to_dict()``; everything downstream rebuilds the
config from the card, so nothing guesses a constant.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

SIDES = ("LEFT", "RIGHT")
REGIONS = ("fc", "tc")
SPLITS = ("database", "downstream", "test")
VISIT_MONTHS = (0, 12, 24, 36, 48, 72, 96)


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
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing constants: {sorted(unknown)}")
        return cls(**data)

    def fingerprint(self) -> str:
        """Short stable hash of the constants (cache keys, card checks)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
