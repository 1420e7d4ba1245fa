"""The evaluation report: ``report.json`` (every number), ``report.md`` (the three tables, the
paper's figures beside ours, what agrees and what does not, the uncertainty section, the cohort,
the model card, the exact command), ``knees.csv`` (per test knee-visit: the MAE, the coverage,
the reference's median and MAD) and the figures:

- ``recall_at_k.png``: recall@k curves of Table 1 with the chance line;
- ``error_by_klg.png``: box plots of Table 2's per-pair median absolute error by KL stratum, per
  method, fc and tc;
- ``examples.png``: test knees (spread over KL grades): ROI, true map, MRIS-S map, U-Net map,
  their error maps and the MRIS-S uncertainty, fc and tc;
- ``reliability.png``: the reliability diagram of the neighbours' SD (observed against predicted
  error per SD bin, per method with a spread), ``report_uncertainty``.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import CARTILAGES
from mris.evaluation.tables import KL_GRADES
from mris.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text
from mris.render import THICKNESS_CMAP, THICKNESS_MAX_MM

# The paper's figures (Chen & Niethammer, MICCAI 2023), as transcribed into this file when the
# evaluation was written (commit 1db4987); only these cells are transcribed, no other cell of the
# paper's tables is in this repository. Table 1: the combined embedding's recall on OAI, gallery
# = the 1,794 baseline test pairs of 897 subjects. Table 2: the femoral "all grades" median of the
# reference statistic (mean over test pairs of each pair's median absolute error at 256 x 256),
# the statistic of our main Table 2 (``reference_stats``), not of the per-pair MAE table.
PAPER_TABLE1_GALLERY = 1794
PAPER = {
    "table1_combined": {"R@1": 0.452, "R@5": 0.755, "R@10": 0.847, "R@20": 0.906},
    "table2_fc_median_mm": {"mris-s": 0.275, "unet": 0.304},
    "table3_klg_accuracy": {"mris-s": 0.789, "mr": 0.775},
    "table3_progression_auc": {"mris-s": 0.702, "mr": 0.739},
}
METHOD_LABELS = {
    "mr": "MR maps (truth)",
    "mris-c": "MRIS-C",
    "mris-s": "MRIS-S",
    "unet": "U-Net",
    "pix2pix": "pix2pix",
    "mean": "database mean map",
    "oracle": "oracle neighbour",
}
CLOSE_DOWNSTREAM = 0.05  # |synthesized - MR| at most this counts as "close" on accuracy / AUC
ERROR_MAX_MM = 1.5


def _pct(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _ci(pair, fmt) -> str:
    if not pair or any(v is None or not math.isfinite(v) for v in pair):
        return ""
    return f" ({fmt(pair[0])}-{fmt(pair[1])})"


# ------------------------------------------------------------------------------- statements
def findings(report: dict[str, Any]) -> list[str]:
    """Plain sentences: where our results agree with the paper's ordering and where not."""
    lines = []
    t1 = report["table1_retrieval"]
    for label, row in t1.items():
        r20, chance = row["recall"]["R@20"], row["chance"]["R@20"]
        lines.append(
            f"Retrieval ({label}): R@20 {_pct(r20)} % against {_pct(chance)} % by chance "
            f"({r20 / chance:.1f}x) on a gallery of {row['gallery']} test knees."
        )
    if "combined" in t1:
        paper_chance = 20 / PAPER_TABLE1_GALLERY
        lines.append(
            f"The paper's combined R@20 {_pct(PAPER['table1_combined']['R@20'])} % is on a "
            "gallery of "
            f"{PAPER_TABLE1_GALLERY:,} baseline test pairs (chance {_pct(paper_chance)} %, "
            f"{PAPER['table1_combined']['R@20'] / paper_chance:.0f}x); recall falls as the "
            "gallery grows, so "
            "only the ratios to chance are comparable across galleries, and even they only roughly."
        )
    t2 = (report.get("table2_reference") or {}).get("methods", {})
    label_of = {"mris-s": "MRIS-S", "mris-c": "MRIS-C", "unet": "the U-Net", "pix2pix": "pix2pix"}
    if "mris-s" in t2 and "unet" in t2:
        for name, label in (("fc", "femoral"), ("tc", "tibial")):
            s, u = t2["mris-s"][name]["all"]["median"], t2["unet"][name]["all"]["median"]
            verdict = "AGREES with" if s < u else "does NOT agree with"
            lines.append(
                f"Synthesis error ({label}, the reference's statistic): MRIS-S {_num(s)} mm "
                f"vs U-Net {_num(u)} mm: "
                f"{verdict} the paper's ordering (MRIS-S below U-Net; the paper's femoral figures "
                f"{PAPER['table2_fc_median_mm']['mris-s']:.3f} vs "
                f"{PAPER['table2_fc_median_mm']['unet']:.3f} mm)."
            )
    for table_key, statistic in (
        ("table2_reference", "per-pair median absolute error"),
        ("table2_error", "per-pair MAE"),
    ):
        for comparison in ((report.get(table_key) or {}).get("paired") or {}).values():
            first = label_of.get(comparison["first"], comparison["first"])
            second = label_of.get(comparison["second"], comparison["second"])
            for name in CARTILAGES:
                p = comparison[name]
                if not p.get("n"):
                    continue
                low, high = p["mean_difference_ci95"]
                share_low, share_high = p["first_better_share_ci95"]
                lines.append(
                    f"Paired ({statistic}, {name}, {first} - {second}): mean difference "
                    f"{p['mean_difference_mm']:+.3f} mm "
                    f"(95 % subject-bootstrap interval {low:+.3f} to {high:+.3f}"
                    + ("; excludes 0" if low > 0 or high < 0 else "; includes 0")
                    + f"); {first} lower on "
                    f"{_pct(p['first_better_share'])} % "
                    f"({_pct(share_low)}-{_pct(share_high)} %) of {p['n']} "
                    f"test knee-visits of {p['subjects']} subjects."
                )
    if "mris-s" in t2 and "mean" in t2:
        s, m = t2["mris-s"]["fc"]["all"]["median"], t2["mean"]["fc"]["all"]["median"]
        lines.append(
            "Against the database mean map (no information from the radiograph): MRIS-S "
            "femoral error "
            f"{_num(s)} vs {_num(m)} mm: "
            + (
                "the radiograph adds information."
                if s < m
                else "the radiograph adds NO measurable information here."
            )
        )
    if "mris-s" in t2 and "oracle" in t2:
        s, o = t2["mris-s"]["fc"]["all"]["median"], t2["oracle"]["fc"]["all"]["median"]
        lines.append(
            "Oracle neighbour (best single database map, uses the truth): femoral error "
            f"{_num(o)} mm vs "
            f"MRIS-S {_num(s)} mm; averaging 20 neighbours "
            + ("beats" if s < o else "does not beat")
            + " the best single map."
        )
    t3 = report.get("table3_downstream")
    if t3 and "mr" in t3["methods"]:
        mr = t3["methods"]["mr"]
        for method in ("mris-s", "mris-c"):
            entry = t3["methods"].get(method)
            if not entry:
                continue
            for task, key, paper_key in (
                ("klg", "accuracy", "table3_klg_accuracy"),
                ("progression", "roc_auc", "table3_progression_auc"),
            ):
                if task not in entry or task not in mr:
                    continue
                ours, reference = entry[task][key], mr[task][key]
                if (
                    ours is None
                    or reference is None
                    or not (math.isfinite(ours) and math.isfinite(reference))
                ):
                    continue
                difference = ours - reference
                paired = ((t3.get("classifiers") or {}).get(t3.get("primary")) or {}).get(
                    "paired_vs_mr"
                ) or {}
                interval = ((paired.get(method) or {}).get(task) or {}).get(key, {}).get("ci95")
                interval_text = (
                    f", paired 95 % subject-bootstrap interval {interval[0]:+.3f} to "
                    f"{interval[1]:+.3f}"
                    if interval and all(v is not None and math.isfinite(v) for v in interval)
                    else ""
                )
                text = (
                    f"Downstream {task} {key.replace('_', ' ')}: {METHOD_LABELS[method]} "
                    f"{_num(ours)} vs MR maps "
                    f"{_num(reference)} ({difference:+.3f}{interval_text}): "
                    + (
                        "close (within 0.05)"
                        if abs(difference) <= CLOSE_DOWNSTREAM
                        else "NOT close (more than 0.05 apart)"
                    )
                )
                if method == "mris-s":
                    paper = PAPER[paper_key]
                    paper_difference = paper["mris-s"] - paper["mr"]
                    same = np.sign(difference) == np.sign(paper_difference)
                    text += (
                        f"; paper {paper['mris-s']:.3f} vs {paper['mr']:.3f} "
                        f"({paper_difference:+.3f}): "
                        + ("the same direction" if same else "the OPPOSITE direction")
                    )
                lines.append(text + ".")
    return lines


# ------------------------------------------------------------------------------------ tables
def markdown(report: dict[str, Any]) -> str:
    out = ["# MRIS evaluation report", ""]
    out += [
        f"Made by `{report['command']}` on {report['created']} in "
        f"{report['seconds']['total']:.0f} s.",
        "",
    ]
    rois = report["rois"]
    out += [
        f"Methods: {', '.join(METHOD_LABELS[m] for m in report['methods'])}; k = {report['k']}; "
        f"NaN rule of the MRIS maps: {report.get('nan_rule', 'majority')}; ROIs from the "
        f"{rois['source']} (the same ROI for every method); 95 % intervals from "
        f"{report['bootstrap_resamples']} "
        "bootstrap resamples of subjects.",
        "",
    ]
    for split in ("test", "downstream"):
        if split in rois:
            s = rois[split]
            skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
            out.append(
                f"- {split}: {s['pairs']} knee-visit pairs; skipped: {skipped}; keypoint "
                f"fallbacks: {s['keypoint_fallbacks']}"
            )
    out += [f"- **warning**: {w}" for w in report.get("warnings", [])]
    out += ["", "## What agrees with the paper and what does not", ""]
    out += [f"- {line}" for line in findings(report)]

    out += table1_markdown(report) + table2_markdown(report)

    from mris.evaluation.report_downstream import table3_markdown
    from mris.evaluation.report_uncertainty import uncertainty_markdown

    out += uncertainty_markdown(report.get("uncertainty"))

    out += table3_markdown(report.get("table3_downstream"))

    out += ["## Cohort", ""]
    cohort = report.get("cohort")
    if cohort:
        mix = cohort.get("baseline_klg_mix", {})
        out += [
            f"- {cohort.get('subjects')} subjects, {cohort.get('knee_visits')} knee-visit pairs "
            f"({', '.join(f'{k} {v}' for k, v in cohort.get('pairs_per_split', {}).items())})",
            "- baseline KL0-4: "
            + " / ".join(f"{100 * mix.get(str(g), 0):.1f}" for g in KL_GRADES)
            + " %",
            f"- mean FC / TC thickness {cohort.get('mean_fc_mm')} / "
            f"{cohort.get('mean_tc_mm')} mm; progressors "
            f"{_pct(cohort.get('progressor_share_latent'))} % (progressor label: KL increase "
            "within 72 months)",
            "",
        ]
    else:
        out += ["No `cohort_stats.json` beside the manifest (not a synthetic cohort).", ""]
    card = report["model_card"]
    artefacts = report["artefacts"]
    out += [
        "## Model and index",
        "",
        f"- model bundle `{artefacts['model']}` (created {card['created']}, profile "
        f"{card['profile']}, "
        f"{card['epochs']} epochs, {card['init']})",
        f"- preprocessing: {', '.join(f'{k} {v}' for k, v in card['preprocess'].items())}",
        *[
            f"- validation recall in the card ({name}, held-out database subjects' first "
            "visits, gallery "
            f"{row['gallery']}): "
            + ", ".join(
                f"{k} {_pct(r)} %{_ci(row['ci95'][k], _pct)}, "
                f"{row['ratio_to_chance'][k]:.1f}x chance"
                for k, r in row["recall"].items()
            )
            for name, row in (card.get("validation_first_visit") or {}).items()
        ],
        f"- indexes: {', '.join(f'{v} {p}' for v, p in artefacts['index_versions'].items())}; "
        f"{artefacts['database_rows']} database maps",
        f"- combined model: `{artefacts['combined_model'] or '-'}`; U-Net: "
        f"`{artefacts['unet'] or '-'}`; "
        f"pix2pix: `{artefacts.get('pix2pix') or '-'}`",
        *[
            f"- {METHOD_LABELS[method]}: {note}"
            for method, note in artefacts.get("baseline_notes", {}).items()
            if note
        ],
        "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()),
        "",
    ]
    return "\n".join(out)


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def table1_markdown(report: dict[str, Any]) -> list[str]:
    ks = ("R@1", "R@5", "R@10", "R@20")
    out = [
        "",
        "## Table 1: retrieval (test split, first visit of each knee)",
        "",
        "Radiograph to the thickness map of the same knee-visit among the test knees' maps "
        "(one query per knee, "
        "the gallery = those knees' maps); recall in % with its 95 % interval (subjects "
        "resampled), then its "
        "ratio to chance (chance R@k = k / gallery) with the interval divided by chance.",
        "",
        "| embedding | gallery | " + " | ".join(ks) + " | median rank |",
        "|---|---|" + "---|" * len(ks) + "---|",
    ]
    rows = report["table1_retrieval"]
    for label, row in rows.items():
        cells = [f"{_pct(row['recall'][k])}{_ci(row['ci95'][k], _pct)}" for k in ks]
        out.append(
            f"| {label} | {row['gallery']} | "
            + " | ".join(cells)
            + f" | {row['median_rank']:.0f} |"
        )
        if "ratio_to_chance" in row:
            ratios = [
                f"{row['ratio_to_chance'][k]:.1f}x{_ci(row['ratio_ci95'][k], lambda v: f'{v:.1f}')}"
                for k in ks
            ]
            out.append(f"| {label}: ratio to chance | | " + " | ".join(ratios) + " | |")
    if rows:
        row = next(iter(rows.values()))
        out.append("| chance | | " + " | ".join(_pct(row["chance"][k]) for k in ks) + " | |")
    paper = PAPER["table1_combined"]
    out.append(
        f"| paper, combined, OAI (gallery of {PAPER_TABLE1_GALLERY:,} baseline test pairs, "
        "897 subjects) | "
        f"{PAPER_TABLE1_GALLERY} | " + " | ".join(f"{100 * paper[k]:.1f}" for k in ks) + " | |"
    )
    out.append(
        "| paper: ratio to chance | | "
        + " | ".join(f"{paper[k] / (int(k[2:]) / PAPER_TABLE1_GALLERY):.0f}x" for k in ks)
        + " | |"
    )
    out += ["", "![recall@k](recall_at_k.png)", ""]
    return out


def table2_markdown(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    t2 = report.get("table2_reference")
    if t2:
        strata = t2["strata"]
        size = "x".join(str(v) for v in t2["size"])
        out += [
            "## Table 2: synthesis error by KL grade (test split, every knee-visit pair; the "
            "reference's statistic)",
            "",
            "As the reference's `synthesis.get_synthesis_stat`: per pair, true and "
            f"synthesized map resized to {size} "
            "with the NaN-aware resize, the median and the MAD of the per-pixel absolute "
            "error; the cell is the mean "
            f"over pairs of each, `median ± MAD` in mm, over {t2['pairs']} pairs; the "
            "interval is the 95 % "
            "subject-bootstrap interval of the `all` median. MRIS maps use the NaN rule "
            f"`{report.get('nan_rule', 'majority')}`.",
            "",
        ]
        paper = PAPER["table2_fc_median_mm"]
        for name, label in (("fc", "femoral"), ("tc", "tibial")):
            out += [
                f"**{label} ({name})**",
                "",
                "| method | " + " | ".join(strata) + " | 95 % interval of the all median |",
                "|---|" + "---|" * (len(strata) + 1),
            ]
            for method, entry in t2["methods"].items():
                cells = [
                    f"{_num(entry[name][st]['median'])} ± {_num(entry[name][st]['mad'])}"
                    for st in strata
                ]
                out.append(
                    f"| {_label(method)} | "
                    + " | ".join(cells)
                    + f" | {_ci(entry[name]['all']['median_ci95'], _num).strip(' ()')} |"
                )
            counts = next(iter(t2["methods"].values()))[name] if t2["methods"] else {}
            out.append(
                "| pairs | "
                + " | ".join(str(counts.get(st, {}).get("n", 0)) for st in strata)
                + " | |"
            )
            if name == "fc":
                for method in ("mris-s", "unet"):
                    out.append(
                        f"| paper (OAI), {_label(method)} | "
                        + " | ".join("n/t" for _ in strata[:-1])
                        + f" | {paper[method]:.3f} (median; MAD n/t) | |"
                    )
            out.append("")
        out += [
            "`n/t`: not transcribed — only the femoral all-grades medians of the paper's "
            "Table 2 are in this "
            "repository (mris/evaluation/report.py, PAPER).",
            "",
        ]
        out += _paired_markdown(t2.get("paired") or {}, "per-pair median absolute error")
    t2b = report["table2_error"]
    out += [
        "## Table 2b: per-pair MAE by KL grade (our statistic, not the paper's)",
        "",
        "Per knee-visit: mean absolute error (mm) over the cartilage both the true and the "
        "synthesized map cover, at "
        f"the maps' own size; median (MAD) over {t2b['knees']} pairs; `coverage` = mean "
        "share of the true cartilage "
        "the map covers. Not comparable with the paper's figures.",
        "",
    ]
    for name, label in (("fc", "femoral"), ("tc", "tibial")):
        out += [
            f"**{label} ({name})**",
            "",
            "| method | "
            + " | ".join(f"KL{g}" for g in KL_GRADES)
            + " | all | 95 % interval of the median | coverage |",
            "|---|" + "---|" * (len(KL_GRADES) + 3),
        ]
        for method, entry in t2b["methods"].items():
            e = entry[name]
            cells = [
                f"{_num(e['by_klg'][str(g)]['median'])} ({_num(e['by_klg'][str(g)]['mad'])})"
                for g in KL_GRADES
            ]
            total = e["all"]
            out.append(
                f"| {_label(method)} | "
                + " | ".join(cells)
                + f" | {_num(total['median'])} ({_num(total['mad'])}) | "
                f"{_ci(total['median_ci95'], _num).strip(' ()')} "
                f"| {_pct(e['coverage_mean'])} % |"
            )
        counts = next(iter(t2b["methods"].values()))[name]["by_klg"] if t2b["methods"] else {}
        out.append(
            "| pairs | "
            + " | ".join(str(counts.get(str(g), {}).get("n", 0)) for g in KL_GRADES)
            + f" | {t2b['knees']} | | |"
        )
        out.append("")
    out += _paired_markdown(t2b.get("paired") or {}, "per-pair MAE")
    out += ["![error by KL grade](error_by_klg.png)", "", "![test knees](examples.png)", ""]
    return out


def _paired_markdown(paired: dict[str, Any], statistic: str) -> list[str]:
    if not paired:
        return []
    out = [
        f"Paired comparisons ({statistic}, first - second, on the knee-visits both have; 95 "
        "% intervals "
        "resample subjects):",
        "",
        "| comparison | map | pairs (subjects) | mean difference (mm) | first lower on |",
        "|---|---|---|---|---|",
    ]
    for comparison in paired.values():
        for name in CARTILAGES:
            p = comparison[name]
            if not p.get("n"):
                continue
            out.append(
                f"| {_label(comparison['first'])} - {_label(comparison['second'])} | {name} "
                f"| {p['n']} ({p['subjects']}) | "
                f"{p['mean_difference_mm']:+.3f}"
                f"{_ci(p['mean_difference_ci95'], lambda v: f'{v:+.3f}')} "
                "| "
                f"{_pct(p['first_better_share'])} %{_ci(p['first_better_share_ci95'], _pct)} |"
            )
    return out + [""]


# ----------------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def recall_figure(report: dict[str, Any]) -> bytes:
    figure = _figure(6, 4)
    ax = figure.subplots()
    gallery = None
    for label, row in report["table1_retrieval"].items():
        curve = np.asarray(row["curve"])
        ax.plot(
            np.arange(1, curve.size + 1),
            100 * curve,
            label=f"{label} (R@20 {_pct(row['recall']['R@20'])} %)",
        )
        gallery = row["gallery"]
    if gallery:
        ks = np.arange(1, min(50, gallery) + 1)
        ax.plot(ks, 100 * np.minimum(1, ks / gallery), "k--", label=f"chance (gallery {gallery})")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Table 1: radiograph -> thickness map, test first visits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(figure)


def error_figure(report: dict[str, Any]) -> bytes:
    """Box plots of Table 2's per-pair statistic (the reference's median absolute error at
    256 x 256) by KL stratum, per method; reports without it fall back to the per-pair MAE."""
    from mris.evaluation.reference_stats import STRATA, stratum_positions

    per_knee = report["per_knee"]
    values_of = per_knee.get("reference_median") or per_knee["mae"]
    what = (
        "median absolute error per pair (reference)"
        if per_knee.get("reference_median")
        else "MAE per pair"
    )
    strata = stratum_positions(per_knee["klg"])
    groups = [name for name in STRATA if name != "all"]
    methods = list(values_of)
    figure = _figure(11, 4)
    axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, (name, label) in zip(axes, (("fc", "femoral"), ("tc", "tibial"))):
        for m, method in enumerate(methods):
            values = np.array(
                [np.nan if v is None else v for v in values_of[method][name]], np.float64
            )
            data = [values[strata[g] & np.isfinite(values)] for g in groups]
            positions = [i + (m - (len(methods) - 1) / 2) * width for i in range(len(groups))]
            keep = [i for i, d in enumerate(data) if d.size]
            if not keep:
                continue
            parts = ax.boxplot(
                [data[i] for i in keep],
                positions=[positions[i] for i in keep],
                widths=width * 0.9,
                patch_artist=True,
                showfliers=False,
                manage_ticks=False,
            )
            colour = f"C{m}"
            for box in parts["boxes"]:
                box.set_facecolor(colour)
                box.set_alpha(0.6)
            ax.plot([], [], color=colour, lw=6, alpha=0.6, label=_label(method))
        ax.set_xticks(list(range(len(groups))), groups)
        ax.set_title(f"Table 2: {label}, {what}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mm")
    axes[1].legend(fontsize=8)
    return _png(figure)


def examples_figure(examples) -> bytes:
    """One row per example knee: ROI, then per cartilage truth | MRIS-S | U-Net | |MRIS-S - truth|
    | |U-Net - truth| | MRIS-S SD (panels a method lacks stay empty)."""
    ids = [p for p in examples.pair_ids if p in examples.maps]
    columns = 1 + 2 * 6
    figure = _figure(1.6 * columns, 1.8 * max(1, len(ids)))
    axes = np.atleast_2d(figure.subplots(max(1, len(ids)), columns))
    figure.suptitle(
        "Test knees: the ROI, then per cartilage the MR map, MRIS-S and U-Net, their absolute "
        "errors and MRIS-S's SD (atlas space: medial left; RIGHT knees mirrored)",
        fontsize=9,
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for r, pair in enumerate(ids):
        row = examples.rows[pair]
        maps = examples.maps[pair]
        axes[r, 0].imshow(examples.roi[pair], cmap="gray", vmin=0, vmax=1)
        mirrored = " (mirrored)" if row.side == "RIGHT" else ""
        axes[r, 0].set_title(
            f"{pair}\nKL{'?' if row.klg is None else row.klg} ROI{mirrored}", fontsize=7
        )
        column = 1
        for name in CARTILAGES:
            truth = maps["mr"][name]
            panels = [(f"{name.upper()} MR", truth, THICKNESS_CMAP, THICKNESS_MAX_MM)]
            for method in ("mris-s", "unet"):
                m = maps.get(method, {}).get(name)
                panels.append(
                    (f"{name.upper()} {METHOD_LABELS[method]}", m, THICKNESS_CMAP, THICKNESS_MAX_MM)
                )
            for method in ("mris-s", "unet"):
                m = maps.get(method, {}).get(name)
                panels.append(
                    (
                        f"|{METHOD_LABELS[method]} - MR|",
                        None if m is None else np.abs(m - truth),
                        "magma",
                        ERROR_MAX_MM,
                    )
                )
            panels.append(
                (
                    f"{name.upper()} MRIS-S SD",
                    maps.get("mris-s", {}).get(f"{name}_std"),
                    "magma",
                    ERROR_MAX_MM,
                )
            )
            for title, image, cmap, vmax in panels:
                ax = axes[r, column]
                column += 1
                if image is None:
                    ax.set_visible(False)
                    continue
                handle = ax.imshow(
                    np.ma.masked_invalid(image),
                    cmap=cmap,
                    vmin=0,
                    vmax=vmax,
                    interpolation="nearest",
                )
                ax.set_title(title, fontsize=7)
                if r == len(ids) - 1:  # the bottom row: columns run medial -> lateral
                    ax.set_xlabel("med. \u2190 \u2192 lat.", fontsize=6)
                if r == 0:
                    bar = figure.colorbar(handle, ax=ax, fraction=0.046, pad=0.02, extend="max")
                    bar.ax.tick_params(labelsize=5)
    return _png(figure)


def knees_csv(report: dict[str, Any]) -> str:
    per_knee = report["per_knee"]
    methods = list(per_knee["mae"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    reference = {kind: per_knee.get(f"reference_{kind}") or {} for kind in ("median", "mad")}
    writer.writerow(
        ["pair_id", "subject_id", "klg"]
        + [
            f"{m}_{n}_{kind}"
            for m in methods
            for n in CARTILAGES
            for kind in ("mae_mm", "coverage", "ref_median_mm", "ref_mad_mm")
        ]
    )
    for i, pair in enumerate(per_knee["pair_ids"]):
        values = []
        for m in methods:
            for n in CARTILAGES:
                values += [
                    f"{per_knee['mae'][m][n][i]:.4f}",
                    f"{per_knee['coverage'][m][n][i]:.4f}",
                ]
                values += [
                    _cell(reference[kind].get(m, {}).get(n), i) for kind in ("median", "mad")
                ]
        writer.writerow(
            [
                pair,
                per_knee["subjects"][i],
                "" if per_knee["klg"][i] is None else per_knee["klg"][i],
            ]
            + values
        )
    return buffer.getvalue()


def _cell(values, i: int) -> str:
    value = None if values is None else values[i]
    return "" if value is None or not math.isfinite(value) else f"{value:.4f}"


def write_report(out: Path, report: dict[str, Any], examples) -> None:
    """Figures and tables first, ``report.json`` last (its presence means the report is whole)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "recall_at_k.png", recall_figure(report))
    atomic_write_bytes(out / "error_by_klg.png", error_figure(report))
    atomic_write_bytes(out / "examples.png", examples_figure(examples))
    if (report.get("uncertainty") or {}).get("methods"):
        from mris.evaluation.report_uncertainty import reliability_figure

        atomic_write_bytes(out / "reliability.png", reliability_figure(report["uncertainty"]))
    atomic_write_text(out / "knees.csv", knees_csv(report))
    atomic_write_text(out / "report.md", markdown(report))
    atomic_write_json(out / "report.json", json_safe(report))


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None (strict JSON), numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
