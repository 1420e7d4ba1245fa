"""The latent description of a synthetic subject: one description feeds both modalities.

A subject has sex, age, BMI, a visit schedule (with dropout) and two knees. Each knee has
- visible anatomy (bone widths, condyle curvature, notch, plateau, spines, alignment) that the
  radiograph renders. The maps are in atlas space: their outline is the atlas's with a small
  residual of its own, never the bone's size or shape;
- cartilage (plate thickness per compartment, which scales with sex and size and shifts with
  alignment; a smooth subject-specific pattern and focal lesions no radiograph shows);
- an OA severity ``s`` that grows linearly in time (``s0 + rate * years``). From ``s`` follow the
  radiographic features: the joint-space narrowing fraction of the worse compartment and the
  osteophyte size. The KL grade is derived from those features only (``kl_grade``), so it is
  monotone in time and a KL change always has a visible cause.

Severity scale: without per-knee noise KL = floor(s) for s in [0, 5); the baseline s0 is drawn
through the quantiles of the OAI baseline KL mix (COHORT_FACTS.md).

Conventions: lengths in mm, angles in degrees, ``alignment_deg`` > 0 is varus (medial load).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import ndtr

from mris.constants import VISIT_MONTHS

# OAI baseline KL mix (COHORT_FACTS.md), cumulative, for the severity quantile map.
KL_BASELINE_MIX = (0.386, 0.178, 0.265, 0.139, 0.033)
_KL_CUMULATIVE = np.concatenate([[0.0], np.cumsum(KL_BASELINE_MIX)])
_KL_CUMULATIVE[-1] = 1.0

# Chance that a subject still attends after each follow-up step (12, 24, 36, 48, 72, 96),
# and the chance that an attending subject has both MR and X-ray at that visit.
_RETENTION = (0.84, 0.82, 0.82, 0.86, 0.58, 0.68)
_ATTEND_WITH_IMAGING = 0.82

# Split proportions by subject (paper: 2,000 / 1,750 / 897 patients).
SPLIT_COUNTS = {"database": 2000, "downstream": 1750, "test": 897}

FAST_PROGRESSOR_BASE_P = 0.022


@dataclass(frozen=True)
class Anatomy:
    """Visible knee anatomy in mm at magnification 1 (what the radiograph draws)."""

    femur_width: float  # bicondylar width
    plateau_width: float  # tibial plateau width
    shaft_femur: float
    shaft_tibia: float
    notch_width: float
    notch_height: float
    condyle_ry_medial: float  # vertical radius of the medial condyle (curvature)
    condyle_ry_lateral: float
    medial_share: float  # share of the bicondylar width taken by the medial condyle
    spine_height: float
    alignment_deg: float  # varus > 0: tilts the joint line and loads the medial side
    fibula_drop: float  # top of fibular head below the lateral plateau
    fibula_size: float
    patella_width: float
    meniscus_medial: float  # meniscus term of the joint space (mm)
    meniscus_lateral: float


@dataclass(frozen=True)
class Cartilage:
    """Cartilage in atlas space. Plate thicknesses are compartment means in mm (healthy)."""

    fc_medial: float
    fc_lateral: float
    tc_medial: float
    tc_lateral: float
    fc_peak_v: float  # AP position of the thickest femoral zone (atlas units), invisible
    # Atlas outline residual (registration leaves a little per-knee variation), drawn apart from
    # the visible anatomy: fc width, fc notch, tc medial, tc lateral (1 = the atlas).
    outline_scale: tuple[float, float, float, float]
    pattern_fc: np.ndarray  # smooth invisible pattern coefficients
    pattern_tc: np.ndarray
    lesions: tuple[
        tuple[str, float, float, float, float, float], ...
    ]  # region,u,v,radius,depth,onset yr


@dataclass(frozen=True)
class KneeLatent:
    side: str
    anatomy: Anatomy
    cartilage: Cartilage
    severity0: float
    rate_per_year: float
    fast_progressor: bool
    osteo_factor: float  # per-knee tendency to grow osteophytes
    worse_compartment: str  # "medial" or "lateral": where OA narrowing happens
    age_thinning_per_year: float  # fraction per year, everywhere
    texture_seed: int  # seeds the fine (invisible) thickness texture of this knee


@dataclass(frozen=True)
class SubjectLatent:
    index: int
    subject_id: str
    sex: str  # "F" or "M"
    age: float
    bmi: float
    split: str
    visits: tuple[int, ...]
    knees: dict[str, KneeLatent] = field(default_factory=dict)


@dataclass(frozen=True)
class KneeState:
    """A knee at one visit: what both modalities render."""

    month: int
    severity: float
    narrowing_medial: float  # fraction of healthy JSW lost
    narrowing_lateral: float
    osteophyte_mm: float
    sclerosis: float  # 0..1
    klg: int
    thinning: float  # age-related thinning fraction everywhere


def subject_rng(seed: int, index: int) -> np.random.Generator:
    """Per-subject generator: deterministic from (seed, subject index), whatever the workers."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), 1, int(index)]))


def assign_splits(n_subjects: int, seed: int) -> list[str]:
    """Splits by subject in the paper's proportions, shuffled with the seed."""
    total = sum(SPLIT_COUNTS.values())
    n_db = round(n_subjects * SPLIT_COUNTS["database"] / total)
    n_down = round(n_subjects * SPLIT_COUNTS["downstream"] / total)
    labels = ["database"] * n_db + ["downstream"] * n_down
    labels += ["test"] * (n_subjects - len(labels))
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 2])).permutation(n_subjects)
    out = [""] * n_subjects
    for position, subject in enumerate(order):
        out[int(subject)] = labels[position]
    return out


def subject_id_for(index: int, n_subjects: int) -> str:
    width = max(4, len(str(n_subjects)))
    return f"S{index + 1:0{width}d}"


def _visits(rng: np.random.Generator) -> tuple[int, ...]:
    visits = [0]
    alive = True
    for month, keep in zip(VISIT_MONTHS[1:], _RETENTION):
        alive = alive and rng.random() < keep
        if alive and rng.random() < _ATTEND_WITH_IMAGING:
            visits.append(month)
    return tuple(visits)


def _severity_from_quantile(q: float) -> float:
    """Map a quantile to severity so that floor(s) follows the OAI baseline KL mix."""
    return float(np.interp(q, _KL_CUMULATIVE, np.arange(6.0)) * 0.999)


def _knee(
    rng: np.random.Generator, side: str, sex: str, age: float, bmi: float, shared: dict[str, float]
) -> KneeLatent:
    male = sex == "M"

    def corr(name: str, rho: float = 0.8) -> float:
        # Anatomy of the two knees of one subject is strongly correlated.
        return rho * shared[name] + np.sqrt(1 - rho**2) * rng.standard_normal()

    size = corr("size", 0.9) + (0.9 if male else -0.6)
    scale = 1.0 + 0.055 * size
    femur_width = 75.0 * scale + rng.normal(0, 1.0)
    plateau_width = femur_width * (1.03 + 0.015 * corr("plateau")) + rng.normal(0, 0.6)
    alignment = 1.2 + 2.4 * corr("alignment", 0.7)
    curv_m = corr("curv_m")
    curv_l = corr("curv_l")
    notch_z = corr("notch")
    medial_share_z = corr("medial_share")
    spine_z = corr("spine")
    anatomy = Anatomy(
        femur_width=femur_width,
        plateau_width=plateau_width,
        shaft_femur=(29.0 + 2.5 * size / 1.0) * (1 + 0.02 * rng.standard_normal()),
        shaft_tibia=(28.0 + 2.5 * size) * (1 + 0.02 * rng.standard_normal()),
        notch_width=20.0 * scale * (1 + 0.09 * notch_z),
        notch_height=22.0 * scale * (1 + 0.08 * rng.standard_normal()),
        condyle_ry_medial=24.0 * scale * (1 + 0.14 * curv_m),
        condyle_ry_lateral=21.0 * scale * (1 + 0.14 * curv_l),
        medial_share=0.51 + 0.025 * medial_share_z,
        spine_height=7.5 * (1 + 0.18 * spine_z),
        alignment_deg=alignment,
        fibula_drop=15.0 + 3.0 * rng.standard_normal(),
        fibula_size=22.0 * scale * (1 + 0.06 * rng.standard_normal()),
        patella_width=43.0 * scale,
        meniscus_medial=max(0.3, (1.75 if not male else 2.3) + 0.25 * rng.standard_normal()),
        meniscus_lateral=max(0.6, (2.2 if not male else 2.5) + 0.25 * rng.standard_normal()),
    )

    # Cartilage: thicker in men and bigger knees; varus shifts thickness from medial to lateral.
    # Part of the variance is tied to visible anatomy, part is invisible (per-knee noise).
    base = 2.30 * (1.0 + 0.06 * size) * np.exp(0.08 * rng.standard_normal())
    ml = np.exp(-0.035 * (alignment - 1.2) + 0.05 * rng.standard_normal())
    cart = Cartilage(
        fc_medial=base * 1.05 * ml,
        fc_lateral=base * 1.00 / np.sqrt(ml),
        tc_medial=base * 0.92 * ml,
        tc_lateral=base * 1.13 / np.sqrt(ml),
        fc_peak_v=0.05 + 0.08 * rng.standard_normal(),
        # Atlas space: the outline is the atlas's, with a small residual that does not follow
        # the bone (size, notch width, condyle share are the radiograph's alone).
        outline_scale=tuple(
            float(1.0 + sd * rng.standard_normal()) for sd in (0.015, 0.05, 0.02, 0.02)
        ),
        pattern_fc=rng.normal(0, 0.07, size=8),
        pattern_tc=rng.normal(0, 0.07, size=8),
        lesions=(),
    )

    # OA: risk rises with age and BMI; the two knees share half their risk.
    z = 0.72 * shared["oa"] + 0.69 * rng.standard_normal()
    q = float(ndtr(z))
    s0 = _severity_from_quantile(q)
    p_fast = FAST_PROGRESSOR_BASE_P * (0.5 + 1.0 * min(s0, 3.5)) * (1 + 0.06 * (bmi - 28.5))
    fast = s0 < 4.0 and rng.random() < min(max(p_fast, 0.0), 0.6)
    if fast:
        rate = float(np.exp(rng.normal(np.log(0.7), 0.35)))
    else:
        rate = float(
            np.exp(rng.normal(np.log(0.006 + 0.004 * s0 + 0.05 * max(s0 - 2.0, 0.0)), 0.6))
        )
    worse = "medial" if rng.random() < ndtr(0.9 + 0.35 * (alignment - 1.2)) else "lateral"

    # Focal lesions: more in worse knees; invisible in the radiograph (depth is in the map only).
    n_lesions = int(rng.poisson(0.8 + 0.7 * s0))
    lesions = []
    for _ in range(n_lesions):
        region = "fc" if rng.random() < 0.6 else "tc"
        medial = rng.random() < (0.7 if worse == "medial" else 0.3)
        u = (-0.5 if medial else 0.5) + rng.normal(0, 0.15)
        v = rng.normal(0.1, 0.3)
        lesions.append(
            (
                region,
                float(u),
                float(v),
                float(rng.uniform(0.05, 0.14)),
                float(rng.uniform(0.25, 0.8)),
                float(rng.uniform(-6, 6)),
            )
        )
    cart = Cartilage(**{**cart.__dict__, "lesions": tuple(lesions)})
    return KneeLatent(
        side=side,
        anatomy=anatomy,
        cartilage=cart,
        severity0=s0,
        rate_per_year=rate,
        fast_progressor=fast,
        osteo_factor=float(np.exp(0.12 * rng.standard_normal())),
        worse_compartment=worse,
        age_thinning_per_year=float(max(0.0, rng.normal(0.004, 0.002))),
        texture_seed=int(rng.integers(0, 2**62)),
    )


def sample_subject(seed: int, index: int, n_subjects: int, split: str) -> SubjectLatent:
    """Draw one subject (both knees, all visits) from its own generator."""
    rng = subject_rng(seed, index)
    sex = "F" if rng.random() < 0.58 else "M"
    age = float(np.clip(rng.normal(61.0, 9.0), 45.0, 79.0))
    bmi = float(np.clip(rng.normal(28.6, 4.8), 17.0, 48.0))
    visits = _visits(rng)
    risk = 0.35 * (age - 61.0) / 9.0 + 0.35 * (bmi - 28.6) / 4.8
    shared = {
        name: float(rng.standard_normal())
        for name in (
            "size",
            "plateau",
            "alignment",
            "curv_m",
            "curv_l",
            "notch",
            "medial_share",
            "spine",
        )
    }
    shared["oa"] = (risk + rng.standard_normal()) / np.sqrt(1 + 0.35**2 * 2)
    knees = {side: _knee(rng, side, sex, age, bmi, shared) for side in ("RIGHT", "LEFT")}
    return SubjectLatent(
        index=index,
        subject_id=subject_id_for(index, n_subjects),
        sex=sex,
        age=round(age, 1),
        bmi=round(bmi, 1),
        split=split,
        visits=visits,
        knees=knees,
    )


def narrowing_fraction(severity: float) -> float:
    """Fraction of the healthy joint space lost in the worse compartment at this severity."""
    s = max(severity, 0.0)
    n = 0.04 * min(s, 2.0) + 0.22 * max(s - 2.0, 0.0) - 0.02 * max(s - 3.0, 0.0)
    return float(min(n, 0.85))


def osteophyte_mm(severity: float, factor: float) -> float:
    return float(1.5 * max(severity - 0.5, 0.0) * factor)


def kl_grade(narrowing: float, osteophyte: float) -> int:
    """KL grade from the radiographic features (KL definitions in COHORT_FACTS.md)."""
    jsn = 0 if narrowing < 0.10 else 1 if narrowing < 0.30 else 2 if narrowing < 0.50 else 3
    ost = 0 if osteophyte < 0.75 else 1 if osteophyte < 2.25 else 2 if osteophyte < 5.25 else 3
    if jsn >= 3 and ost >= 2:
        return 4
    if (jsn >= 2 and ost >= 1) or ost >= 3 or jsn >= 3:
        return 3
    if ost >= 2:
        return 2
    if ost >= 1 or jsn >= 1:
        return 1
    return 0


def knee_state(knee: KneeLatent, month: int) -> KneeState:
    years = month / 12.0
    severity = knee.severity0 + knee.rate_per_year * years
    worse = narrowing_fraction(severity)
    other = 0.25 * worse
    med, lat = (worse, other) if knee.worse_compartment == "medial" else (other, worse)
    osteo = osteophyte_mm(severity, knee.osteo_factor)
    sclerosis = float(np.clip((severity - 2.3) / 2.0, 0.0, 1.0))
    return KneeState(
        month=month,
        severity=float(severity),
        narrowing_medial=med,
        narrowing_lateral=lat,
        osteophyte_mm=osteo,
        sclerosis=sclerosis,
        klg=kl_grade(worse, osteo),
        thinning=float(min(knee.age_thinning_per_year * years, 0.3)),
    )


# The progression label's horizon: the paper's progression task asks whether the KL grade rises
# within 72 months (DESIGN.md, Table 3), the cohort's 72-month visit (constants.VISIT_MONTHS).
PROGRESSION_MONTHS = 72


def is_progressor(knee: KneeLatent) -> int:
    """1 when the knee's KL grade rises between month 0 and month ``PROGRESSION_MONTHS`` (72;
    true latent trajectory, defined even when that visit was not attended)."""
    return int(knee_state(knee, PROGRESSION_MONTHS).klg > knee_state(knee, 0).klg)
