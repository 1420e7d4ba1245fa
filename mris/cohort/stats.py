"""Realism figures of a cohort, computed from per knee-visit records (cohort_stats.json).

Each figure sits beside the OAI figure it imitates (COHORT_FACTS.md); ``REFERENCE_RANGES``
are the ranges the realism test accepts.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

OAI_BASELINE_KLG = {0: 0.386, 1: 0.178, 2: 0.265, 3: 0.139, 4: 0.033}

# figure -> (low, high) accepted; the OAI value is in COHORT_FACTS.md.
REFERENCE_RANGES: dict[str, tuple[float, float]] = {
    "medial_jsw_mm.F.mean": (4.3, 5.3),  # OAI/Beattie: 4.8 +- 0.7 (healthy women)
    "medial_jsw_mm.M.mean": (5.2, 6.2),  # 5.7 +- 0.8 (healthy men)
    "mean_fc_mm": (2.0, 2.6),  # 2.28
    "mean_tc_mm": (2.0, 2.6),  # 2.32
    "annual_thickness_loss_pct.all": (0.2, 3.0),  # 1-3 %/yr in the progression subcohort
    "annual_thickness_loss_pct.progressors": (1.0, 5.0),
    # Emrani 2008 meta-analysis: 0.13 +- 0.15 mm/yr in OA knees; about 0.2 in OAI knees.
    "medial_jsn_mm_per_year.klg_2_plus": (0.10, 0.25),
    # Cross-sectional Pearson r, radiographic JSW vs MR compartment thickness: 0.43-0.81 (Ther Adv
    # Musculoskelet Dis 2021), 0.78 medial in neutral and 0.86 in varus OAI knees (Bone Joint Res
    # 2021); docs/COHORT.md.
    "jsw_thickness_r.medial": (0.43, 0.86),
    "jsw_thickness_r.lateral": (0.43, 0.86),
    # JSW lost (worse compartment) by KL transition: 0->1/0->2/1->2 about 0.2-0.3 mm in OAI
    # (loose: the weight-bearing term moves one knee-visit's JSW by 0.5 mm SD and few knees make
    # these transitions); 2->4 about 1.2 mm in OAI. Checked when at least 5 knees made it. KL4
    # needs 50 % narrowing of the worse compartment and KL2 allows up to 30 %, so 2->4 loses at
    # least a fifth of a 5 mm joint space; the cohort sits near 2 mm, the range's upper part.
    "kl_transition_jsw_loss_mm.minor.mean": (-0.2, 0.6),
    "kl_transition_jsw_loss_mm.2_to_4.mean": (0.8, 2.5),
    # Atlas space: the outline does not follow the visible bone size.
    "outline_vs_bone_size_r": (-0.2, 0.2),
    "progression_48m_share": (0.10, 0.21),  # about 15 % of knees by 48 months
    "nan_share.fc": (0.32, 0.48),  # about 40 %
    "nan_share.tc": (0.32, 0.48),
    "visits_per_subject": (2.8, 4.0),  # about 3.4 in OAI (MR + X-ray)
}
KLG_TOLERANCE = 0.06  # absolute, per grade, on a few hundred subjects


@dataclass(frozen=True)
class KneeVisitRecord:
    subject_id: str
    side: str
    month: int
    sex: str
    klg: int
    progressor: int
    fc_mean_mm: float
    tc_mean_mm: float
    fc_nan_share: float
    tc_nan_share: float
    jsw_medial_mm: float
    jsw_lateral_mm: float
    fc_medial_mm: float
    fc_lateral_mm: float
    tc_medial_mm: float
    tc_lateral_mm: float
    jsw_worse_mm: float = float("nan")  # JSW of the knee's narrowing (worse) compartment
    fc_denuded_share: float = 0.0  # share of the FC outline with thickness < 0.1 mm
    visible: tuple[float, ...] = ()  # radiograph-visible latents (VISIBLE_LATENTS order)
    cells_mm: tuple[float, ...] = ()  # FC and TC block means (NaN where a block is outside)


# What the radiograph shows of a knee-visit (the regressors of the explained share).
VISIBLE_LATENTS = (
    "jsw_medial_mm",
    "jsw_lateral_mm",
    "osteophyte_mm",
    "sclerosis",
    "klg",
    "alignment_deg",
    "femur_width_mm",
    "plateau_width_mm",
    "notch_width_mm",
    "medial_share",
    "condyle_ry_medial_mm",
    "condyle_ry_lateral_mm",
    "spine_height_mm",
    "male",
)


def _r(x: float, digits: int = 3) -> float:
    return round(float(x), digits)


def cohort_stats(records: list[KneeVisitRecord], n_subjects: int) -> dict[str, Any]:
    knees: dict[tuple[str, str], list[KneeVisitRecord]] = defaultdict(list)
    for rec in records:
        knees[(rec.subject_id, rec.side)].append(rec)
    for visits in knees.values():
        visits.sort(key=lambda r: r.month)
    baseline = [v[0] for v in knees.values()]
    n_base = max(len(baseline), 1)
    mix = {str(g): _r(sum(r.klg == g for r in baseline) / n_base) for g in range(5)}

    jsw: dict[str, dict[str, float]] = {}
    for sex in ("F", "M"):
        values = [r.jsw_medial_mm for r in baseline if r.sex == sex and r.klg <= 1]
        jsw[sex] = {
            "mean": _r(np.mean(values)) if values else float("nan"),
            "sd": _r(np.std(values)) if values else float("nan"),
            "n": len(values),
        }

    loss_all, loss_prog, jsn_all, jsn_oa = [], [], [], []
    observed_48, progressed_48 = 0, 0
    for visits in knees.values():
        first, last = visits[0], visits[-1]
        years = (last.month - first.month) / 12.0
        if years >= 1.0:
            before = first.fc_mean_mm + first.tc_mean_mm
            after = last.fc_mean_mm + last.tc_mean_mm
            pct = (before - after) / before / years * 100.0
            loss_all.append(pct)
            if first.progressor:
                loss_prog.append(pct)
            rate = (first.jsw_medial_mm - last.jsw_medial_mm) / years
            jsn_all.append(rate)
            if first.klg >= 2:
                jsn_oa.append(rate)
        at_48 = [v for v in visits if v.month == 48]
        if at_48:
            observed_48 += 1
            progressed_48 += int(at_48[0].klg > first.klg)

    def mean(values: list[float]) -> float:
        return _r(np.mean(values)) if values else float("nan")

    by_sex_visits = defaultdict(set)
    for rec in records:
        by_sex_visits[rec.subject_id].add(rec.month)
    plate = {
        name: mean([getattr(r, f"{name}_mm") for r in baseline])
        for name in ("fc_medial", "fc_lateral", "tc_medial", "tc_lateral")
    }
    transitions = _kl_transition_losses(knees)
    correlation = {
        "medial": _pearson(
            [r.jsw_medial_mm for r in baseline], [r.fc_medial_mm + r.tc_medial_mm for r in baseline]
        ),
        "lateral": _pearson(
            [r.jsw_lateral_mm for r in baseline],
            [r.fc_lateral_mm + r.tc_lateral_mm for r in baseline],
        ),
    }
    with_visible = [r for r in baseline if r.visible]
    outline_r = _pearson(
        [1.0 - r.fc_nan_share for r in with_visible],
        [r.visible[VISIBLE_LATENTS.index("femur_width_mm")] for r in with_visible],
    )
    severe = [r.fc_denuded_share for r in records if r.klg == 4]
    return {
        "subjects": n_subjects,
        "knee_visits": len(records),
        "visits_per_subject": _r(np.mean([len(m) for m in by_sex_visits.values()])),
        "baseline_klg_mix": mix,
        "oai_baseline_klg_mix": {str(k): v for k, v in OAI_BASELINE_KLG.items()},
        "medial_jsw_mm": jsw,
        "mean_fc_mm": mean([r.fc_mean_mm for r in baseline]),
        "mean_tc_mm": mean([r.tc_mean_mm for r in baseline]),
        "plate_mean_mm": plate,
        "mean_fc_mm_by_klg": {
            str(g): mean([r.fc_mean_mm for r in baseline if r.klg == g]) for g in range(5)
        },
        "annual_thickness_loss_pct": {"all": mean(loss_all), "progressors": mean(loss_prog)},
        "medial_jsn_mm_per_year": {"all": mean(jsn_all), "klg_2_plus": mean(jsn_oa)},
        "progression_48m_share": _r(progressed_48 / observed_48) if observed_48 else float("nan"),
        "progression_48m_knees_observed": observed_48,
        "progressor_share_latent": _r(np.mean([v[0].progressor for v in knees.values()])),
        "nan_share": {
            "fc": mean([r.fc_nan_share for r in records]),
            "tc": mean([r.tc_nan_share for r in records]),
        },
        "jsw_thickness_r": correlation,
        "map_variance_explained_by_visible": explained_share(with_visible),
        "outline_vs_bone_size_r": outline_r,
        "kl_transition_jsw_loss_mm": transitions,
        "fc_denuded_share": {
            "klg_4": mean(severe),
            "all": mean([r.fc_denuded_share for r in records]),
        },
    }


def _pearson(x: list[float], y: list[float]) -> float:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan")
    return _r(np.corrcoef(x, y)[0, 1])


def _kl_transition_losses(
    knees: dict[tuple[str, str], list[KneeVisitRecord]],
) -> dict[str, dict[str, float]]:
    """Mean JSW lost in the worse compartment by KL transition: from the first visit to the first
    visit at the knee's highest grade seen (narrowing after that is not the transition's)."""
    groups: dict[str, list[float]] = defaultdict(list)
    names = {(0, 1): "minor", (0, 2): "minor", (1, 2): "minor", (0, 3): "0_to_3", (2, 4): "2_to_4"}
    for visits in knees.values():
        first = visits[0]
        top = max(v.klg for v in visits)
        reached = next(v for v in visits if v.klg == top)
        name = names.get((first.klg, top))
        if name and not np.isnan(first.jsw_worse_mm):
            groups[name].append(first.jsw_worse_mm - reached.jsw_worse_mm)
    return {
        name: {
            "mean": _r(np.mean(groups[name])) if len(groups[name]) >= 5 else float("nan"),
            "n": len(groups[name]),
        }
        for name in ("minor", "0_to_3", "2_to_4")
    }


def explained_share(records: list[KneeVisitRecord]) -> float:
    """R^2 of a linear regression of the maps' block means (FC and TC, blocks inside the outline
    of every knee) on the radiograph-visible latents, pooled over blocks: the share of the
    between-knee map variance a linear read-out of what the radiograph shows can explain."""
    if len(records) <= len(VISIBLE_LATENTS) + 5 or not records[0].cells_mm:
        return float("nan")
    cells = np.array([r.cells_mm for r in records], dtype=float)
    cells = cells[:, ~np.isnan(cells).any(axis=0)]
    design = np.column_stack(
        [np.ones(len(records)), np.array([r.visible for r in records], dtype=float)]
    )
    coef, *_ = np.linalg.lstsq(design, cells, rcond=None)
    residual = cells - design @ coef
    total = ((cells - cells.mean(axis=0)) ** 2).sum()
    return _r(1.0 - (residual**2).sum() / total) if total > 0 else float("nan")


def lookup(stats: dict[str, Any], dotted: str) -> float:
    value: Any = stats
    for part in dotted.split("."):
        value = value[part]
    return float(value)


def check_realism(stats: dict[str, Any]) -> list[str]:
    """Figures outside their accepted range (empty when all pass)."""
    problems = []
    for name, (low, high) in REFERENCE_RANGES.items():
        value = lookup(stats, name)
        if np.isnan(value) and name.startswith("kl_transition"):
            continue  # fewer than 5 knees made that transition
        if not low <= value <= high:
            problems.append(f"{name} = {value} outside [{low}, {high}]")
    for grade, target in OAI_BASELINE_KLG.items():
        value = stats["baseline_klg_mix"][str(grade)]
        if abs(value - target) > KLG_TOLERANCE:
            problems.append(f"baseline KL{grade} share {value} vs OAI {target}")
    return problems
