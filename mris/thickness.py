"""Thickness maps: ``.npy`` (mm, NaN outside cartilage) -> the encoder's map input.

Encoder input (DESIGN.md): NaN -> 0, divided by ``thickness_scale_mm`` (3.0), resized with the
shared anti-aliased ``mris.imageops.resize`` to encoder_px x encoder_px. NaN becomes 0 before
resizing, so cartilage edges blend towards 0 instead of spreading NaN. The combined variant
(MRIS-C) stacks fc over tc: 2 * encoder_px rows by encoder_px columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mris.constants import PreprocessConfig
from mris.errors import InvalidThicknessMap
from mris.imageops import resize
from mris.npyio import load_npy


def validate_thickness_map(array: np.ndarray, name: str = "thickness map") -> np.ndarray:
    """Check a map (2-D, floating point, finite or NaN, not all NaN); returns float32."""
    array = np.asarray(array)
    if array.ndim != 2:
        raise InvalidThicknessMap(f"{name} must be 2-D, got shape {array.shape}")
    if array.dtype.kind != "f":
        raise InvalidThicknessMap(f"{name} must hold floating-point mm, got {array.dtype}")
    if min(array.shape) < 2:
        raise InvalidThicknessMap(f"{name} is {array.shape[0]} x {array.shape[1]}, too small")
    if np.isinf(array).any():
        raise InvalidThicknessMap(f"{name} holds infinite values")
    if np.isnan(array).all():
        raise InvalidThicknessMap(f"{name} is NaN everywhere (no cartilage)")
    return array.astype(np.float32, copy=False)


def load_thickness_map(path: str | Path) -> np.ndarray:
    """A thickness map from ``.npy``: float32 (H, W) in mm, NaN outside cartilage.

    Raises ``InvalidThicknessMap`` (missing, unreadable, wrong shape or type, inf, all NaN).
    """
    path = Path(path)
    try:
        array = load_npy(path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InvalidThicknessMap(f"thickness map {path} does not exist") from exc
    except (OSError, ValueError, EOFError) as exc:
        raise InvalidThicknessMap(f"thickness map {path} is not a readable .npy array") from exc
    return validate_thickness_map(array, name=f"thickness map {path.name}")


def map_to_input(thickness_mm: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """float32 (encoder_px, encoder_px): NaN -> 0, / thickness_scale_mm, resized."""
    thickness = np.asarray(thickness_mm, dtype=np.float32)
    if thickness.ndim != 2:
        raise InvalidThicknessMap(f"thickness map must be 2-D, got shape {thickness.shape}")
    scaled = np.nan_to_num(thickness, nan=0.0) / np.float32(config.thickness_scale_mm)
    return resize(scaled, (config.encoder_px, config.encoder_px))


def combined_input(fc_mm: np.ndarray, tc_mm: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """float32 (2 * encoder_px, encoder_px): the femoral input over the tibial input."""
    return np.concatenate([map_to_input(fc_mm, config), map_to_input(tc_mm, config)], axis=0)
