"""Femoral (FC) and tibial (TC) cartilage thickness maps in the shared 2-D atlas space.

Orientation (both sides alike, DESIGN.md): columns run medial -> lateral (the MEDIAL
compartment is on the map's LEFT, small column index), rows run anterior -> posterior (top
row anterior). The grid is ``grid x grid`` with a NaN padding of ``grid * 5 / 310`` cells each
side, like OAI's 310 x 310 (300 + 5 + 5).

- FC: the femoral cartilage unrolled into a horseshoe: both condyles joined anteriorly by the
  trochlea, the intercondylar notch opening posteriorly (bottom of the map).
- TC: the two tibial plateaus as two ellipses (medial larger and longer).

The maps are in atlas space: one outline per cartilage, with a small per-knee residual that
does not follow the visible bone (``Cartilage.outline_scale``).

Thickness (mm) = compartment plate mean (blended smoothly across the femoral midline) x
central-thick envelope x smooth subject pattern x fine texture, minus OA loss (central
weight-bearing zone of the narrowing compartment, denuded at its core in severe narrowing),
minus age thinning, minus focal lesions. Values are float32, NaN outside cartilage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy.ndimage import gaussian_filter

from mris.cohort.latent import KneeLatent, KneeState

_BASIS = ((1, 0), (0, 1), (1, 1), (2, 0), (0, 2), (2, 1), (1, 2), (2, 2))


@dataclass(frozen=True)
class MapPair:
    fc: np.ndarray  # float32 (grid, grid) mm, NaN outside
    tc: np.ndarray
    central_mm: dict[str, float]  # "fc_medial", "fc_lateral", "tc_medial", "tc_lateral"


@lru_cache(maxsize=8)
def atlas_coords(grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) atlas coordinates of each cell, both (grid, grid); [-1, 1] inside the padding.
    u: medial (-1) -> lateral (+1); v: anterior (-1) -> posterior (+1)."""
    pad = grid * 5.0 / 310.0
    axis = (np.arange(grid) + 0.5 - pad) / (grid - 2 * pad) * 2.0 - 1.0
    v, u = np.meshgrid(axis, axis, indexing="ij")
    return u, v


def _basis(u: np.ndarray, v: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    out = np.zeros_like(u)
    for (ku, kv), c in zip(_BASIS, coefficients):
        out += c * np.cos(np.pi * ku * (u + 1) / 2) * np.cos(np.pi * kv * (v + 1) / 2)
    return out


@lru_cache(maxsize=64)
def _texture(seed: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    fields = []
    for _ in range(2):
        noise = gaussian_filter(rng.standard_normal((grid, grid)), sigma=grid / 45.0, mode="wrap")
        fields.append(noise / (noise.std() + 1e-9))
    return fields[0], fields[1]


def fc_mask(knee: KneeLatent, grid: int) -> np.ndarray:
    u, v = atlas_coords(grid)
    width, notch, _, _ = knee.cartilage.outline_scale
    outer = (u / (0.95 * min(width, 1.04))) ** 2 + (v / 0.93) ** 2 < 1.0
    half = 0.19 * notch
    notch_region = (np.abs(u) < half) & (v > 0.12) | (
        (u / half) ** 2 + ((v - 0.12) / 0.22) ** 2 < 1
    )
    return outer & ~notch_region


def tc_masks(knee: KneeLatent, grid: int) -> tuple[np.ndarray, np.ndarray]:
    u, v = atlas_coords(grid)
    _, _, sm, sl = knee.cartilage.outline_scale
    medial = (((u + 0.5) / (0.47 * sm)) ** 2 + (v / (0.88 * sm)) ** 2 < 1) & (u < -0.02)
    lateral = (((u - 0.5) / (0.46 * sl)) ** 2 + ((v + 0.02) / (0.80 * sl)) ** 2 < 1) & (u > 0.02)
    return medial, lateral


def _normalised(envelope: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return envelope / float(envelope[mask].mean())


def _medial_weight(u: np.ndarray) -> np.ndarray:
    """1 on the medial side, 0 on the lateral, a smooth ramp (10-90 %) about 0.18 atlas units wide
    at u = 0."""
    return 1.0 / (1.0 + np.exp(u / 0.04))


def _plate_field(
    envelope: np.ndarray,
    mask: np.ndarray,
    medial_weight: np.ndarray,
    medial_mm: float,
    lateral_mm: float,
) -> np.ndarray:
    """Per-cell plate factor blending the two compartments smoothly, so that each compartment's
    mean of ``factor x envelope`` over its half of ``mask`` is its plate mean."""
    medial_side = mask & (medial_weight > 0.5)
    lateral_side = mask & (medial_weight <= 0.5)
    medial = medial_mm / float(envelope[medial_side].mean())
    lateral = lateral_mm / float(envelope[lateral_side].mean())
    return medial_weight * medial + (1.0 - medial_weight) * lateral


def oa_loss(narrowing: np.ndarray | float, central: np.ndarray) -> np.ndarray:
    """Fraction of thickness lost (0..1): proportional to the compartment's narrowing in its
    central weight-bearing zone; where narrowing passes 0.55 the zone's core is denuded."""
    proportional = 1.15 * narrowing * central
    denuded = np.clip((narrowing - 0.55) / 0.2, 0.0, 1.0) * np.clip(
        (central - 0.55) / 0.15, 0.0, 1.0
    )
    return np.minimum(1.0, proportional + denuded)


def thickness_maps(knee: KneeLatent, state: KneeState, grid: int) -> MapPair:
    """Both maps of one knee at one visit, and the central (weight-bearing) compartment means
    that set the radiograph's joint-space width."""
    u, v = atlas_coords(grid)
    cart = knee.cartilage
    tex_fc, tex_tc = _texture(knee.texture_seed, grid)
    years = state.month / 12.0
    peak = cart.fc_peak_v
    medial_side = u < 0

    # FC ------------------------------------------------------------------------------
    # The condyles meet in the trochlea at u = 0. Each compartment's plate mean is applied
    # through a smooth medial weight, not a step at u = 0: a step (two plate means, two
    # normalisations) left a seam on the femoral midline (mean jump 0.165 mm between the two
    # middle columns against a median 0.026 mm between neighbours).
    mask = fc_mask(knee, grid)
    medial_weight = _medial_weight(u)
    condyles = np.exp(-(((u + 0.5) / 0.34) ** 2 + ((v - peak) / 0.5) ** 2))
    condyles += np.exp(-(((u - 0.5) / 0.34) ** 2 + ((v - peak) / 0.5) ** 2))
    envelope = 0.45 + 0.85 * condyles
    envelope *= 1.0 + _basis(u, v, cart.pattern_fc) + 0.06 * tex_fc
    plate = _plate_field(envelope, mask, medial_weight, cart.fc_medial, cart.fc_lateral)
    fc = plate * envelope
    central_fc = np.exp(-(((np.abs(u) - 0.5) / 0.26) ** 2 + ((v - peak) / 0.36) ** 2))

    # TC ------------------------------------------------------------------------------
    tc_med, tc_lat = tc_masks(knee, grid)
    tmask = tc_med | tc_lat
    r_m = ((u + 0.5) / 0.47) ** 2 + (v / 0.88) ** 2
    r_l = ((u - 0.5) / 0.46) ** 2 + ((v + 0.02) / 0.80) ** 2
    t_env = np.where(
        medial_side, 0.45 + 0.8 * np.exp(-r_m / 0.45), 0.45 + 0.8 * np.exp(-r_l / 0.45)
    )
    t_env *= 1.0 + _basis(u, v, cart.pattern_tc) + 0.06 * tex_tc
    tenv_m = _normalised(t_env, tc_med)
    tenv_l = _normalised(t_env, tc_lat)
    tc = np.where(medial_side, cart.tc_medial * tenv_m, cart.tc_lateral * tenv_l)
    central_tc = np.where(medial_side, np.exp(-r_m / 0.35), np.exp(-r_l / 0.35))

    # OA loss in the central zone of each compartment; age thinning everywhere. In severe
    # narrowing the core of the zone is denuded (thickness 0 inside the outline), as real
    # atlas-space maps of KL4 knees show it.
    # The femoral compartments meet in the trochlea (smooth); the tibial plateaus are apart.
    narrowing_fc = (
        medial_weight * state.narrowing_medial + (1 - medial_weight) * state.narrowing_lateral
    )
    narrowing_tc = np.where(medial_side, state.narrowing_medial, state.narrowing_lateral)
    fc = fc * (1.0 - oa_loss(narrowing_fc, central_fc)) * (1.0 - state.thinning)
    tc = tc * (1.0 - oa_loss(narrowing_tc, central_tc)) * (1.0 - state.thinning)

    # Focal lesions: invisible in the radiograph; they deepen over time after their onset.
    for region, lu, lv, radius, depth, onset in cart.lesions:
        grown = float(np.clip(0.4 + (years - onset) / 5.0, 0.0, 1.0))
        if grown <= 0:
            continue
        dip = depth * grown * np.exp(-((u - lu) ** 2 + (v - lv) ** 2) / (2 * radius**2))
        if region == "fc":
            fc = fc * (1.0 - dip)
        else:
            tc = tc * (1.0 - dip)

    fc = np.where(mask, np.clip(fc, 0.0, None), np.nan).astype(np.float32)
    tc = np.where(tmask, np.clip(tc, 0.0, None), np.nan).astype(np.float32)

    def zone_mean(values: np.ndarray, zone: np.ndarray) -> float:
        return float(values[zone].mean()) if zone.any() else 0.0

    fc_zone = mask & (central_fc > 0.5)
    tc_zone = tmask & (central_tc > 0.5)
    central = {
        "fc_medial": zone_mean(fc, fc_zone & medial_side),
        "fc_lateral": zone_mean(fc, fc_zone & ~medial_side),
        "tc_medial": zone_mean(tc, tc_zone & medial_side),
        "tc_lateral": zone_mean(tc, tc_zone & ~medial_side),
    }
    return MapPair(fc=fc, tc=tc, central_mm=central)


# Per-visit weight-bearing term of the radiographic JSW (mm, SD): the radiograph is taken
# standing, the MR lying, and load, meniscal extrusion and positioning move the JSW of one knee
# from visit to visit without any change in the cartilage (COHORT_FACTS.md: the gap between
# weight-bearing radiographs and non-weight-bearing MR explains much of the weak agreement of
# changes). With the meniscus term it calibrates the cross-sectional JSW-thickness correlation
# (docs/COHORT.md).
WEIGHT_BEARING_SD_MM = 0.5
# Share of the central (femoral + tibial) cartilage that shows as JSW (the minimum under load is
# below the zone mean); the rest of the healthy JSW is the meniscus term.
JSW_CARTILAGE_FACTOR = 0.5


def weight_bearing_mm(knee: KneeLatent, month: int) -> tuple[float, float]:
    """Medial and lateral weight-bearing offsets of one knee-visit (deterministic from the knee)."""
    rng = np.random.default_rng(np.random.SeedSequence([knee.texture_seed, 7, int(month)]))
    medial, lateral = rng.normal(0.0, WEIGHT_BEARING_SD_MM, size=2)
    return float(medial), float(lateral)


def joint_space_mm(
    knee: KneeLatent, state: KneeState, central_mm: dict[str, float]
) -> tuple[float, float]:
    """Medial and lateral minimum JSW (mm) the radiograph shows: 0.62 x (femoral + tibial
    central cartilage; the minimum under load is below the zone mean) + the meniscus term,
    which extrudes as the compartment narrows, + the visit's weight-bearing offset (invisible
    in the maps). Never below 0.2 mm."""
    anat = knee.anatomy
    load_m, load_l = weight_bearing_mm(knee, state.month)
    medial = JSW_CARTILAGE_FACTOR * (central_mm["fc_medial"] + central_mm["tc_medial"])
    lateral = JSW_CARTILAGE_FACTOR * (central_mm["fc_lateral"] + central_mm["tc_lateral"])
    medial += anat.meniscus_medial * (1.0 - state.narrowing_medial) + load_m * (
        1.0 - state.narrowing_medial
    )
    lateral += anat.meniscus_lateral * (1.0 - state.narrowing_lateral) + load_l * (
        1.0 - state.narrowing_lateral
    )
    return float(max(medial, 0.2)), float(max(lateral, 0.2))
