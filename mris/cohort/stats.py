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
        jsw[sex] = {"mean": _r(np.mean(values)) if values else float("nan"),
                    "sd": _r(np.std(values)) if values else float("nan"), "n": len(values)}

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
    plate = {name: mean([getattr(r, f"{name}_mm") for r in baseline])
             for name in ("fc_medial", "fc_lateral", "tc_medial", "tc_lateral")}
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
        "mean_fc_mm_by_klg": {str(g): mean([r.fc_mean_mm for r in baseline if r.klg == g]) for g in range(5)},
        "annual_thickness_loss_pct": {"all": mean(loss_all), "progressors": mean(loss_prog)},
        "medial_jsn_mm_per_year": {"all": mean(jsn_all), "klg_2_plus": mean(jsn_oa)},
        "progression_48m_share": _r(progressed_48 / observed_48) if observed_48 else float("nan"),
        "progression_48m_knees_observed": observed_48,
        "progressor_share_latent": _r(np.mean([v[0].progressor for v in knees.values()])),
        "nan_share": {"fc": mean([r.fc_nan_share for r in records]),
                      "tc": mean([r.tc_nan_share for r in records])},
    }


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
        if not low <= value <= high:
            problems.append(f"{name} = {value} outside [{low}, {high}]")
    for grade, target in OAI_BASELINE_KLG.items():
        value = stats["baseline_klg_mix"][str(grade)]
        if abs(value - target) > KLG_TOLERANCE:
            problems.append(f"baseline KL{grade} share {value} vs OAI {target}")
    return problems
