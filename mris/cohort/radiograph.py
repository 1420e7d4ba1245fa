"""Rendering the bilateral standing PA knee radiograph of one subject-visit.

Image frame: x (columns) left -> right, y (rows) top -> bottom, pixel ``i`` centred at
``i * spacing_mm``. The patient's RIGHT knee is on the image's LEFT. Each knee is drawn in its
own anatomical frame (a, b) in mm at magnification 1: ``a`` > 0 lateral, ``b`` > 0 distal,
origin the true joint centre (middle of the joint space at the knee's midline). For the right
knee lateral is the image's left, for the left knee the image's right, so in both knees the
MEDIAL compartment faces the image centre and the fibular head sits on the outer side.

The image is a line-integral ("attenuation") picture: soft-tissue envelope + femur (shaft,
metaphysis, two condyles, intercondylar notch) + tibia (plateau with spines, metaphysis,
shaft) + fibular head and shaft + a faint patella; bones get a bright cortical rim and a
textured cancellous interior. Medial and lateral joint-space widths are given (from the
maps, ``maps.joint_space_mm``); osteophytes and subchondral sclerosis grow with severity.
Positioning (rotation, translation, flexion tilt, magnification), exposure, scanner contrast
and quantum noise vary per visit. Output: 12-bit values (0..4095), bone bright.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from mris.cohort.latent import KneeLatent, KneeState

FIELD_WIDTH_MM = 432.0
FIELD_HEIGHT_MM = 356.0
FULL_SPACINGS_MM = (0.10, 0.15, 0.16, 0.17, 0.20)
FULL_SPACING_WEIGHTS = (0.10, 0.46, 0.16, 0.16, 0.12)


def small_spacing_mm(full_spacing_mm: float) -> float:
    """Demo-size spacing: the full-size clusters compressed into 0.96-1.18 mm so every small
    image is about 370-450 px wide and the clusters stay distinct."""
    return round(1.08 * (full_spacing_mm / 0.15) ** 0.3, 4)


def medium_spacing_mm(full_spacing_mm: float) -> float:
    """Evaluation-size spacing: the same clusters compressed into 0.80-0.98 mm, finer than a
    128 px encoder input's 140 mm / 128 px = 1.09 mm/px; images about 440-540 px wide."""
    return round(0.90 * (full_spacing_mm / 0.15) ** 0.3, 4)


def spacing_for_size(image_size: str, full_spacing_mm: float) -> float:
    """Pixel spacing (mm) of an image of ``image_size`` ("small", "medium", "full") drawn from
    the OAI cluster ``full_spacing_mm``."""
    if image_size == "full":
        return full_spacing_mm
    if image_size == "medium":
        return medium_spacing_mm(full_spacing_mm)
    return small_spacing_mm(full_spacing_mm)


@dataclass(frozen=True)
class Positioning:
    """Per-visit acquisition geometry in detector mm."""

    centres_mm: dict[str, tuple[float, float]]  # side -> (x, y) of the joint centre
    rotation_deg: float  # whole-image rotation
    magnification: float
    flexion_mm: dict[str, float]  # front/back plateau rim offset (fixed-flexion tilt)
    leg_rotation_mm: dict[str, float]  # internal/external rotation: fibula overlap shift
    exposure: float
    gamma: float
    offset: float
    dose: float


def sample_positioning(rng: np.random.Generator) -> Positioning:
    mag = float(np.clip(rng.normal(1.1, 0.045), 1.0, 1.2))
    distance = float(np.clip(rng.normal(197.0, 17.0), 150.0, 250.0))
    mid_x = 211.5 + rng.normal(0, 7.0)
    y = 177.0 + rng.normal(0, 9.0)
    tilt = rng.normal(0, 1.2)
    right = (mid_x - distance / 2, y + np.sin(np.radians(tilt)) * distance / 2)
    left = (mid_x + distance / 2, y - np.sin(np.radians(tilt)) * distance / 2)
    return Positioning(
        centres_mm={
            "RIGHT": (float(right[0]), float(right[1])),
            "LEFT": (float(left[0]), float(left[1])),
        },
        rotation_deg=float(tilt),
        magnification=mag,
        flexion_mm={s: float(rng.normal(0, 1.5)) for s in ("RIGHT", "LEFT")},
        leg_rotation_mm={s: float(rng.normal(0, 2.5)) for s in ("RIGHT", "LEFT")},
        exposure=float(rng.uniform(0.85, 1.15)),
        gamma=float(rng.uniform(0.8, 1.2)),
        offset=float(rng.uniform(120, 420)),
        dose=float(rng.uniform(0.6, 1.4)),
    )


def _sig(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _ellipse_sd(a, b, ca, cb, ra, rb):
    """Approximate signed distance (mm, > 0 inside) to an axis-aligned ellipse."""
    r = np.sqrt(((a - ca) / ra) ** 2 + ((b - cb) / rb) ** 2)
    return (1.0 - r) * min(ra, rb)


def _knee_attenuation(
    a,
    b,
    knee: KneeLatent,
    state: KneeState,
    jsw: tuple[float, float],
    texture,
    px_mm: float,
    flexion_mm: float,
    leg_rot_mm: float,
    soft_tissue_mm: float,
) -> np.ndarray:
    """Attenuation of one knee in its anatomical frame (a, b mm). Arrays of one window."""
    anat = knee.anatomy
    jm, jl = jsw
    edge = max(px_mm, 0.25)  # edge softness: anti-aliased boundaries keep sub-pixel JSW

    t = _sig(a / 3.0)  # 0 medial -> 1 lateral
    half_js = (1 - t) * jm / 2 + t * jl / 2

    # Soft tissue: elliptical cross-section, thigh wider than calf.
    st_half = 0.5 * soft_tissue_mm
    st_half = st_half * (1.0 + 0.0018 * np.clip(-b, -150, 200))
    chord = np.sqrt(np.clip(1.0 - (a / st_half) ** 2, 0, 1))
    soft = 0.8 * chord * _sig((st_half - np.abs(a)) / edge)

    # Tibia --------------------------------------------------------------------------
    pw = anat.plateau_width / 2
    spines = anat.spine_height * (
        np.exp(-(((a + 4.0) / 3.2) ** 2)) + 0.85 * np.exp(-(((a - 5.0) / 3.2) ** 2))
    )
    rim = np.maximum(np.abs(a) - (pw - 5.0), 0.0)
    concave = np.where(a < 0, 1.0 * np.exp(-(((a + pw / 2) / (pw / 3)) ** 2)), 0.0)
    plateau = half_js - spines + concave + rim**2 / 5.0
    tib_shift = -np.tan(np.radians(0.4 * anat.alignment_deg)) * np.maximum(b - 12.0, 0.0)
    tib_half = pw + (anat.shaft_tibia / 2 - pw) * _smoothstep((b - 12.0) / 70.0)
    sd_tib = np.minimum(b - plateau, tib_half - np.abs(a - tib_shift))

    # Femur --------------------------------------------------------------------------
    nw = anat.notch_width
    wm = (anat.femur_width - nw) * anat.medial_share
    wl = (anat.femur_width - nw) * (1 - anat.medial_share)
    cm, cl = -nw / 2 - wm / 2, nw / 2 + wl / 2
    rym, ryl = anat.condyle_ry_medial, anat.condyle_ry_lateral
    bm, bl = -jm / 2 - rym, -jl / 2 - ryl
    sd_med = _ellipse_sd(a, b, cm, bm, wm / 2 + 1.0, rym)
    sd_lat = _ellipse_sd(a, b, cl, bl, wl / 2 + 1.0, ryl)
    b_top = min(bm, bl)
    above = b_top - b  # mm above the condyle centres
    fem_shift = np.tan(np.radians(5.0 - 0.5 * anat.alignment_deg)) * np.maximum(above, 0.0)
    fem_centre = (cm + cl) / 2 + fem_shift
    fem_half = anat.femur_width / 2 + (anat.shaft_femur / 2 - anat.femur_width / 2) * _smoothstep(
        above / 60.0
    )
    # Block above the condyle centres, continued down between the condyle centres; the
    # intercondylar notch is an arch cut into it from the joint line.
    sd_block = np.where(
        b < b_top,
        fem_half - np.abs(a - fem_centre),
        np.minimum((cl - cm) / 2 - np.abs(a - (cm + cl) / 2), b_top + 0.6 * min(rym, ryl) - b),
    )
    notch_centre = (cm + wm / 2 + cl - wl / 2) / 2
    notch = _ellipse_sd(a, b, notch_centre, -half_js + 2.0, nw / 2, anat.notch_height)
    sd_fem = np.maximum(np.maximum(sd_med, sd_lat), np.minimum(sd_block, -notch))

    # Fibula: head on the lateral side below the plateau, partly over the tibia's edge.
    fib_r = anat.fibula_size / 2
    fib_a = pw - 3.0 + leg_rot_mm
    fib_b = jl / 2 + anat.fibula_drop + fib_r * 0.9
    sd_fib_head = _ellipse_sd(a, b, fib_a, fib_b, fib_r, fib_r * 1.1)
    shaft_a = fib_a + 2.0 - 0.05 * np.maximum(b - fib_b, 0)
    sd_fib_shaft = np.where(b > fib_b, 6.5 - np.abs(a - shaft_a), -99.0)
    sd_fib = np.maximum(sd_fib_head, sd_fib_shaft)

    # Osteophytes: spurs at the joint margins, medial larger in medial OA.
    osteo = state.osteophyte_mm
    med_scale = 1.0 if knee.worse_compartment == "medial" else 0.6
    spur = -99.0 * np.ones_like(a)
    if osteo > 0.3:
        for sign, scale in ((-1, med_scale), (1, 1.6 - med_scale)):
            size = osteo * scale
            if size < 0.3:
                continue
            j = jm if sign < 0 else jl
            tib_edge = pw
            fem_edge = (wm if sign < 0 else wl) + nw / 2 + 1.0
            ry = rym if sign < 0 else ryl
            spur = np.maximum(
                spur,
                _ellipse_sd(
                    a,
                    b,
                    sign * (tib_edge + size * 0.3),
                    j / 2 + 5.0,
                    size * 0.6 + 1.0,
                    size * 0.3 + 1.2,
                ),
            )
            spur = np.maximum(
                spur,
                _ellipse_sd(
                    a,
                    b,
                    sign * (fem_edge * 0.87 + size * 0.3),
                    -j / 2 - 0.5 * ry,
                    size * 0.55 + 1.0,
                    size * 0.3 + 1.2,
                ),
            )
    sd_fem = np.maximum(sd_fem, np.where(b < 0, spur, -99.0))
    sd_tib = np.maximum(sd_tib, np.where(b >= 0, spur, -99.0))

    def bone(sd, density):
        inside = _sig(sd / edge)
        depth = np.sqrt(np.clip(sd / 14.0, 0.0, 1.0))
        cortex = inside * np.exp(-np.clip(sd, 0, None) / 1.3)
        return inside * density * (0.45 + 0.45 * depth) * (1.0 + 0.13 * texture) + 0.7 * cortex

    # The notch is not empty in a PA view (trochlea and patella overlap it): reduced density.
    notch_fill = 0.3 * _sig(notch / edge)
    att = soft + bone(sd_fem, 1.0) + bone(sd_tib, 1.0) + 0.8 * bone(sd_fib, 1.0) + notch_fill

    # Fixed-flexion tilt: the back rim of the plateau projects as a second faint line.
    rim_line = np.exp(-(((b - (plateau + flexion_mm + 1.0)) / 0.7) ** 2)) * (np.abs(a) < pw - 2)
    att += 0.25 * abs(flexion_mm) / 1.5 * rim_line * _sig(sd_tib / edge)

    # Subchondral sclerosis in the narrowing compartment.
    if state.sclerosis > 0:
        comp = (a < -4) if knee.worse_compartment == "medial" else (a > 4)
        band = np.exp(-np.clip(b - plateau, 0, None) / 4.0) * _sig(sd_tib / edge)
        band += np.exp(-np.clip(-half_js - b, 0, None) / 4.0) * _sig(sd_fem / edge) * (b < 0)
        att += 0.6 * state.sclerosis * band * comp

    # Patella: a faint oval over the distal femur.
    pat = _sig(
        _ellipse_sd(a, b, 3.0, -32.0, anat.patella_width / 2, anat.patella_width * 0.62) / edge
    )
    att += 0.18 * pat * (1.0 + 0.3 * texture)
    return att


@dataclass(frozen=True)
class RenderedRadiograph:
    pixels: np.ndarray  # uint16 (rows, cols), 12-bit, bone bright (MONOCHROME2 sense)
    spacing_mm: float
    centres_px: dict[str, tuple[float, float]]  # side -> (col, row)


def render_radiograph(
    knees: dict[str, KneeLatent],
    states: dict[str, KneeState],
    jsw: dict[str, tuple[float, float]],
    positioning: Positioning,
    spacing_mm: float,
    rng: np.random.Generator,
    bmi: float = 28.6,
) -> RenderedRadiograph:
    """Render one bilateral PA radiograph; ``jsw`` is side -> (medial, lateral) mm."""
    cols = round(FIELD_WIDTH_MM / spacing_mm)
    rows = round(FIELD_HEIGHT_MM / spacing_mm)
    y_mm = (np.arange(rows) * spacing_mm)[:, None]
    # Cancellous texture: band-pass noise, features about 1.5-4 mm.
    noise = rng.standard_normal((rows, cols)).astype(np.float32)
    fine = gaussian_filter(noise, sigma=max(0.8 / spacing_mm, 0.6))
    coarse = gaussian_filter(noise, sigma=max(4.0 / spacing_mm, 1.0))
    texture = fine / (fine.std() + 1e-6) - 0.5 * coarse / (coarse.std() + 1e-6)

    attenuation = np.zeros((rows, cols), dtype=np.float32)
    rot = np.radians(positioning.rotation_deg)
    mag = positioning.magnification
    half_window_mm = 118.0 * mag
    centres_px = {}
    soft_tissue_mm = float(np.clip(112.0 + 2.2 * (bmi - 28.6), 95.0, 150.0))
    for side, knee in knees.items():
        cx, cy = positioning.centres_mm[side]
        centres_px[side] = (cx / spacing_mm, cy / spacing_mm)
        c0 = max(0, int((cx - half_window_mm) / spacing_mm))
        c1 = min(cols, int((cx + half_window_mm) / spacing_mm) + 1)
        x_mm = (np.arange(c0, c1) * spacing_mm)[None, :]
        dx, dy = x_mm - cx, y_mm - cy
        joint_tilt = rot + np.radians(0.35 * knee.anatomy.alignment_deg) * (
            1 if side == "LEFT" else -1
        )
        a_img = dx * np.cos(joint_tilt) + dy * np.sin(joint_tilt)
        b_img = -dx * np.sin(joint_tilt) + dy * np.cos(joint_tilt)
        lateral_sign = -1.0 if side == "RIGHT" else 1.0
        a = lateral_sign * a_img / mag
        b = b_img / mag
        att = _knee_attenuation(
            a,
            b,
            knee,
            states[side],
            jsw[side],
            texture[:, c0:c1],
            spacing_mm / mag,
            positioning.flexion_mm[side],
            positioning.leg_rotation_mm[side],
            soft_tissue_mm,
        )
        # Smoothly fade the window edge so the two windows blend without a seam.
        fade = _smoothstep((half_window_mm - np.abs(dx)) / 10.0)
        attenuation[:, c0:c1] = np.maximum(attenuation[:, c0:c1], att * fade)

    # Image formation: transmitted counts with Poisson-like noise, then log and a scanner curve.
    mu = 1.25 * positioning.exposure
    counts = 1800.0 * positioning.dose * (spacing_mm / 0.15) ** 2 * np.exp(-mu * attenuation)
    counts = counts + rng.standard_normal(counts.shape).astype(np.float32) * np.sqrt(counts + 1.0)
    log_att = -np.log(
        np.clip(counts, 1.0, None) / (1800.0 * positioning.dose * (spacing_mm / 0.15) ** 2)
    )
    log_att = np.clip(log_att, 0.0, None)
    scaled = (log_att / 3.2) ** positioning.gamma
    stored = positioning.offset + (3900.0 - positioning.offset) * scaled
    pixels = np.clip(np.round(stored), 0, 4095).astype(np.uint16)
    return RenderedRadiograph(pixels=pixels, spacing_mm=spacing_mm, centres_px=centres_px)
