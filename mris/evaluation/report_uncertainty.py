"""The report's uncertainty section (``report.json``'s ``uncertainty``, made by
``mris.evaluation.uncertainty``): its ``report.md`` section and ``reliability.png``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mris.constants import CARTILAGES
from mris.evaluation.tables import KL_GRADES

LABELS = {"mris-c": "MRIS-C", "mris-s": "MRIS-S"}
CARTILAGE_LABELS = {"fc": "femoral (fc)", "tc": "tibial (tc)"}


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _interval(pair, fmt=_pct, between: str = "-") -> str:
    if not pair or any(v is None or not math.isfinite(v) for v in pair):
        return ""
    return f" ({fmt(pair[0])}{between}{fmt(pair[1])})"


def _bin_label(entry: dict[str, Any]) -> str:
    low, high = entry["sd_from_mm"], entry["sd_to_mm"]
    return f"≥{low:g}" if high is None else f"{low:g}-{high:g}"


def _grade_header(extra: str) -> tuple[str, str]:
    grades = " | ".join(f"KL{g}" for g in KL_GRADES)
    return f"{grades} | {extra} |", "---|" * (len(KL_GRADES) + 1)


def uncertainty_markdown(section: dict[str, Any] | None) -> list[str]:
    """The section after Table 2 (nothing for a report without one)."""
    if not section or not section.get("methods"):
        return []
    gaussian = section["gaussian_within"]
    out = [
        "## Uncertainty: what the spread and the intervals mean (test split)",
        "",
        "Measured on the maps as the service makes them (NaN rule "
        f"`{section['nan_rule']}`, whatever rule the tables use), over the pixels where the true "
        f"and the synthesized map both have cartilage: {section['knees']} test knee-visits of "
        f"{section['subjects']} subjects, by the knee-visit's true KL grade; in brackets the 95 % "
        "interval from resampling subjects (statistics pooled over the drawn knees' pixels).",
        "",
        "**The neighbours' SD as it is served.** Share (%) of pixels whose true thickness lies "
        "within ±1 SD and ±2 SD of the synthesized value (were the SD that of Gaussian errors: "
        f"{_pct(gaussian['within_1sd'])} % and {_pct(gaussian['within_2sd'])} %; lower means "
        "over-confident):",
        "",
    ]
    grades, rule = _grade_header("all (95 % interval)")
    out += ["| method | map | within | " + grades, "|---|---|---|" + rule]
    for method, by_cartilage in section["methods"].items():
        for cartilage in CARTILAGES:
            coverage = by_cartilage[cartilage]["sd_coverage"]
            for key, label in (("within_1sd", "±1 SD"), ("within_2sd", "±2 SD")):
                cells = [_pct(coverage["by_klg"][str(g)][key]) for g in KL_GRADES]
                total = coverage["all"]
                out.append(
                    f"| {LABELS.get(method, method)} | {cartilage} | {label} | "
                    + " | ".join(cells)
                    + f" | {_pct(total[key])}{_interval(total[f'{key}_ci95'])} |"
                )
    first = next(iter(section["methods"].values()))["fc"]["sd_coverage"]
    out += [
        "| knee-visits | | | "
        + " | ".join(str(first["by_klg"][str(g)]["knees"]) for g in KL_GRADES)
        + f" | {first['all']['knees']} |",
        "",
        "**Reliability diagram** (`reliability.png`, all grades; every grade's bins are in "
        "`report.json`): the pixels binned by their predicted SD (mm); per bin the RMS of the "
        "predicted SD, the RMS of the observed error |truth - synthesized| and the pixel count. "
        "A calibrated SD has RMS error = RMS SD; above it the SD is too small.",
        "",
    ]
    bins = next(iter(section["methods"].values()))["fc"]["reliability"]["all"]
    out += [
        "| method, map | SD bin (mm) | " + " | ".join(_bin_label(b) for b in bins) + " |",
        "|---|---|" + "---|" * len(bins),
    ]
    for method, by_cartilage in section["methods"].items():
        for cartilage in CARTILAGES:
            entries = by_cartilage[cartilage]["reliability"]["all"]
            name = f"{LABELS.get(method, method)} {cartilage}"
            out += [
                f"| {name} | RMS SD | " + " | ".join(_num(b["sd_rms_mm"]) for b in entries) + " |",
                "| | RMS error | " + " | ".join(_num(b["error_rms_mm"]) for b in entries) + " |",
                "| | pixels | " + " | ".join(f"{b['pixels']:,}" for b in entries) + " |",
            ]
    out += [
        "",
        "![reliability diagram](reliability.png)",
        "",
        "**Does a wider spread flag a worse knee?** Spearman rank correlation between a "
        "knee-visit's mean SD and its MAE (both over the same pixels):",
        "",
    ]
    grades, rule = _grade_header("all (95 % interval)")
    out += ["| method | map | " + grades, "|---|---|" + rule]
    for method, by_cartilage in section["methods"].items():
        for cartilage in CARTILAGES:
            spearman = by_cartilage[cartilage]["spearman_sd_mae"]
            cells = [_num(spearman["by_klg"][str(g)]["rho"], 2) for g in KL_GRADES]
            total = spearman["all"]
            out.append(
                f"| {LABELS.get(method, method)} | {cartilage} | "
                + " | ".join(cells)
                + f" | {_num(total['rho'], 2)}"
                + f"{_interval(total['rho_ci95'], lambda v: _num(v, 2), ' to ')} |"
            )
    out += [""] + interval_markdown(section.get("intervals") or {})
    return out


def interval_markdown(intervals: dict[str, Any]) -> list[str]:
    if "skipped" in intervals or not intervals:
        reason = intervals.get("skipped", "not measured")
        return [f"**Calibrated intervals (MRIS-S)**: not measured: {reason}.", ""]
    coverage = intervals["coverage"]
    goals = intervals["goals"]
    calibration = intervals["calibration"]
    data = calibration.get("data") or {}
    source = intervals["source_text"]
    fitted_on = (
        f"{data.get('knees')} knees of {data.get('subjects')} subjects"
        + ("" if intervals["source"] == "fitted" else f" of the `{data.get('split')}` split")
        if data.get("knees")
        else "knees not stated"
    )
    out = [
        f"**Calibrated intervals (MRIS-S, stated coverage {_pct(coverage)} %)**, "
        f"calibration: {source} ({fitted_on}; k = {data.get('k', '?')}, NaN rule "
        f"`{data.get('nan_rule', '?')}`; split conformal on |y - m| / (s + "
        f"{calibration['sd_floor_mm']:g} mm), one quantile per cartilage and group of the "
        "neighbours' weighted KL grade). Share (%) of pixels whose true thickness lies in the "
        "interval, with its 95 % subject-bootstrap interval and PASS/FAIL against the goals "
        f"(within {goals['overall_points']:g} points of {_pct(coverage)} % overall, within "
        f"{goals['per_grade_points']:g} points in every KL grade; a grade with fewer than "
        f"{goals['min_grade_knees']} test knee-visits is not judged); then the mean interval "
        "width over the synthesized cartilage (mm):",
        "",
    ]
    grades, rule = _grade_header("all")
    out += ["| map | | " + grades, "|---|---|" + rule]
    for cartilage in CARTILAGES:
        entry = intervals.get(cartilage)
        if not entry:
            continue
        cells = [entry["by_klg"][str(g)] for g in KL_GRADES] + [entry["all"]]
        out += [
            f"| {cartilage} | coverage | "
            + " | ".join(
                f"{_pct(c['coverage'])}{_interval(c['coverage_ci95'])} {c['verdict']}"
                for c in cells
            )
            + " |",
            "| | mean width (mm) | " + " | ".join(_num(c["mean_width_mm"]) for c in cells) + " |",
            "| | knee-visits | " + " | ".join(str(c["knees"]) for c in cells) + " |",
        ]
    verdict = intervals["verdict"]
    failed = intervals.get("failed") or []
    out += [
        "",
        f"**Verdict: {verdict}**"
        + (f" (outside the goal: {', '.join(failed)})" if failed else "")
        + ".",
        "",
    ]
    out += [f"- note: {note}" for note in intervals.get("notes") or []]
    return out + ([""] if intervals.get("notes") else [])


def reliability_figure(section: dict[str, Any]) -> bytes:
    """Per cartilage: RMS observed error against RMS predicted SD per SD bin, one line per
    method, the identity line; below, each bin's pixel count."""
    from mris.evaluation.report import _figure, _png

    figure = _figure(11, 6)
    axes = figure.subplots(2, 2, gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    figure.suptitle(
        "Reliability of the neighbours' SD (test split, "
        f"{section['knees']} knee-visits, NaN rule {section['nan_rule']}): "
        "observed against predicted error per SD bin",
        fontsize=10,
    )
    methods = list(section["methods"])
    edges = np.asarray(section["sd_bin_edges_mm"], np.float64)
    for column, cartilage in enumerate(CARTILAGES):
        top, bottom = axes[0, column], axes[1, column]
        limit = 0.0
        for m, method in enumerate(methods):
            bins = section["methods"][method][cartilage]["reliability"]["all"]
            kept = [b for b in bins if b["pixels"]]
            x = np.array([b["sd_rms_mm"] for b in kept], np.float64)
            y = np.array([b["error_rms_mm"] for b in kept], np.float64)
            if x.size:
                limit = max(limit, float(np.nanmax(x)), float(np.nanmax(y)))
            top.plot(x, y, "o-", color=f"C{m}", label=LABELS.get(method, method))
            counts = np.array([b["pixels"] for b in bins], np.float64)
            offset = (m - (len(methods) - 1) / 2) * 0.8 / max(1, len(methods))
            positions = np.arange(len(bins)) + offset
            bottom.bar(
                positions, counts, width=0.8 / max(1, len(methods)), color=f"C{m}", alpha=0.7
            )
        limit = 1.1 * limit if limit > 0 else 1.0
        top.plot([0, limit], [0, limit], "k--", lw=1, label="perfectly calibrated SD")
        top.set_xlim(0, limit)
        top.set_ylim(0, limit)
        top.set_xlabel("predicted SD (RMS in the bin, mm)")
        top.set_ylabel("observed error (RMS in the bin, mm)")
        top.set_title(CARTILAGE_LABELS[cartilage], fontsize=9)
        top.grid(alpha=0.3)
        top.legend(fontsize=8, loc="upper left")
        labels = [
            f"≥{edges[b]:g}" if b == len(edges) - 1 else f"{edges[b]:g}-{edges[b + 1]:g}"
            for b in range(len(edges))
        ]
        bottom.set_xticks(np.arange(len(edges)), labels, rotation=45, fontsize=7)
        bottom.set_xlabel("predicted SD bin (mm)")
        bottom.set_ylabel("pixels in the bin")
        bottom.grid(alpha=0.3, axis="y")
    return _png(figure)
