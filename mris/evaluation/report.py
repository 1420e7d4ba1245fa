"""The evaluation report: ``report.json`` (every number), ``report.md`` (the three tables, the
paper's figures beside ours, what agrees and what does not, the cohort, the model card, the exact
command), ``knees.csv`` (per test knee-visit errors) and the figures:

- ``recall_at_k.png``: recall@k curves of Table 1 with the chance line;
- ``error_by_klg.png``: box plots of the per-knee MAE by KL grade, per method, fc and tc;
- ``examples.png``: test knees (spread over KL grades): ROI, true map, MRIS-S map, U-Net map,
  their error maps and the MRIS-S uncertainty, fc and tc.

Figures are drawn on ``matplotlib.figure.Figure`` objects (no pyplot state).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from mris.evaluation.tables import KL_GRADES
from mris.fsutil import atomic_write_bytes, atomic_write_json, atomic_write_text

PAPER = {
    "table1_combined": {"R@1": 0.452, "R@5": 0.755, "R@10": 0.847, "R@20": 0.906},
    "table2_fc_median_mm": {"mris-s": 0.275, "unet": 0.304},
    "table3_klg_accuracy": {"mris-s": 0.789, "mr": 0.775},
    "table3_progression_auc": {"mris-s": 0.702, "mr": 0.739},
}
METHOD_LABELS = {"mr": "MR maps (truth)", "mris-c": "MRIS-C", "mris-s": "MRIS-S", "unet": "U-Net", "mean": "database mean map",
                 "oracle": "oracle neighbour"}
CLOSE_DOWNSTREAM = 0.05  # |synthesized - MR| at most this counts as "close" on accuracy / AUC
THICKNESS_MAX_MM = 4.5
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
        lines.append(f"Retrieval ({label}): R@20 {_pct(r20)} % against {_pct(chance)} % by chance "
                     f"({r20 / chance:.1f}x) on a gallery of {row['gallery']} test knees.")
    t2 = report["table2_error"]["methods"]
    if "mris-s" in t2 and "unet" in t2:
        for name, label in (("fc", "femoral"), ("tc", "tibial")):
            s, u = t2["mris-s"][name]["all"]["median"], t2["unet"][name]["all"]["median"]
            verdict = "AGREES with" if s < u else "does NOT agree with"
            lines.append(f"Synthesis error ({label}): MRIS-S median {_num(s)} mm vs U-Net {_num(u)} mm: "
                         f"{verdict} the paper's ordering (MRIS-S below U-Net; the paper's femoral medians "
                         f"{PAPER['table2_fc_median_mm']['mris-s']:.3f} vs {PAPER['table2_fc_median_mm']['unet']:.3f} mm).")
        for comparison in (report["table2_error"].get("paired") or {}).values():
            labels = {"mris-s": "MRIS-S", "mris-c": "MRIS-C", "unet": "the U-Net"}
            first, second = labels[comparison["first"]], labels[comparison["second"]]
            for name in ("fc", "tc"):
                p = comparison[name]
                if not p.get("n"):
                    continue
                low, high = p["mean_difference_ci95"]
                share_low, share_high = p["first_better_share_ci95"]
                lines.append(
                    f"Paired ({name}, {first} - {second}): mean difference {p['mean_difference_mm']:+.3f} mm "
                    f"(95 % subject-bootstrap interval {low:+.3f} to {high:+.3f}); {first} closer on "
                    f"{_pct(p['first_better_share'])} % ({_pct(share_low)}-{_pct(share_high)} %) of {p['n']} "
                    f"test knee-visits of {p['subjects']} subjects.")
    if "mris-s" in t2 and "mean" in t2:
        s, m = t2["mris-s"]["fc"]["all"]["median"], t2["mean"]["fc"]["all"]["median"]
        lines.append(f"Against the database mean map (no information from the radiograph): MRIS-S femoral median "
                     f"{_num(s)} vs {_num(m)} mm: " + ("the radiograph adds information." if s < m else
                                                     "the radiograph adds NO measurable information here."))
    if "mris-s" in t2 and "oracle" in t2:
        s, o = t2["mris-s"]["fc"]["all"]["median"], t2["oracle"]["fc"]["all"]["median"]
        lines.append(f"Oracle neighbour (best single database map, uses the truth): femoral median {_num(o)} mm vs "
                     f"MRIS-S {_num(s)} mm; averaging 20 neighbours " + ("beats" if s < o else "does not beat")
                     + " the best single map.")
    t3 = report.get("table3_downstream")
    if t3 and "mr" in t3["methods"]:
        mr = t3["methods"]["mr"]
        for method in ("mris-s", "mris-c"):
            entry = t3["methods"].get(method)
            if not entry:
                continue
            for task, key, paper_key in (("klg", "accuracy", "table3_klg_accuracy"), ("progression", "roc_auc", "table3_progression_auc")):
                if task not in entry or task not in mr:
                    continue
                ours, reference = entry[task][key], mr[task][key]
                if ours is None or reference is None or not (math.isfinite(ours) and math.isfinite(reference)):
                    continue
                difference = ours - reference
                paired = (((t3.get("classifiers") or {}).get(t3.get("primary")) or {}).get("paired_vs_mr") or {})
                interval = ((paired.get(method) or {}).get(task) or {}).get(key, {}).get("ci95")
                interval_text = (f", paired 95 % subject-bootstrap interval {interval[0]:+.3f} to {interval[1]:+.3f}"
                                 if interval and all(v is not None and math.isfinite(v) for v in interval) else "")
                text = (f"Downstream {task} {key.replace('_', ' ')}: {METHOD_LABELS[method]} {_num(ours)} vs MR maps "
                        f"{_num(reference)} ({difference:+.3f}{interval_text}): "
                        + ("close (within 0.05)" if abs(difference) <= CLOSE_DOWNSTREAM else "NOT close (more than 0.05 apart)"))
                if method == "mris-s":
                    paper = PAPER[paper_key]
                    paper_difference = paper["mris-s"] - paper["mr"]
                    same = np.sign(difference) == np.sign(paper_difference)
                    text += (f"; paper {paper['mris-s']:.3f} vs {paper['mr']:.3f} ({paper_difference:+.3f}): "
                             + ("the same direction" if same else "the OPPOSITE direction"))
                lines.append(text + ".")
    return lines


# ------------------------------------------------------------------------------------ tables
def markdown(report: dict[str, Any]) -> str:
    out = ["# MRIS evaluation report", ""]
    out += [f"Made by `{report['command']}` on {report['created']} in {report['seconds']['total']:.0f} s.", ""]
    rois = report["rois"]
    out += [f"Methods: {', '.join(METHOD_LABELS[m] for m in report['methods'])}; k = {report['k']}; "
            f"NaN rule of the MRIS maps: {report.get('nan_rule', 'majority')}; ROIs from the "
            f"{rois['source']} (the same ROI for every method); 95 % intervals from {report['bootstrap_resamples']} "
            "bootstrap resamples of subjects.", ""]
    for split in ("test", "downstream"):
        if split in rois:
            s = rois[split]
            skipped = ", ".join(f"{n} {r}" for r, n in s["skipped"].items()) or "none"
            out.append(f"- {split}: {s['pairs']} knee-visit pairs; skipped: {skipped}; keypoint fallbacks: {s['keypoint_fallbacks']}")
    out += [f"- **warning**: {w}" for w in report.get("warnings", [])]
    out += ["", "## What agrees with the paper and what does not", ""]
    out += [f"- {line}" for line in findings(report)]

    out += ["", "## Table 1: retrieval (test split, first visit of each knee)", "",
            "Radiograph to the thickness map of the same knee-visit among the test knees' maps; % with 95 % interval.", "",
            "| embedding | gallery | R@1 | R@5 | R@10 | R@20 | chance R@20 | median rank |", "|---|---|---|---|---|---|---|---|"]
    for label, row in report["table1_retrieval"].items():
        cells = [f"{_pct(row['recall'][k])}{_ci(row['ci95'][k], _pct)}" for k in ("R@1", "R@5", "R@10", "R@20")]
        out.append(f"| {label} | {row['gallery']} | " + " | ".join(cells) + f" | {_pct(row['chance']['R@20'])} | {row['median_rank']:.0f} |")
    paper = PAPER["table1_combined"]
    out.append(f"| paper, combined, OAI (gallery of 1,794 baseline test pairs, 897 subjects) | | {100 * paper['R@1']:.1f} | {100 * paper['R@5']:.1f} | "
               f"{100 * paper['R@10']:.1f} | {100 * paper['R@20']:.1f} | | |")
    out += ["", "![recall@k](recall_at_k.png)", ""]

    t2 = report["table2_error"]
    out += ["## Table 2: synthesis error by KL grade (test split, every knee-visit pair)", "",
            f"Per knee-visit: mean absolute error (mm) over the cartilage both the true and the synthesized map cover; "
            f"median (MAD) over {t2['knees']} pairs; `coverage` = mean share of the true cartilage the map covers.", ""]
    for name, label in (("fc", "femoral"), ("tc", "tibial")):
        out += [f"**{label} ({name})**", "",
                "| method | " + " | ".join(f"KL{g}" for g in KL_GRADES) + " | all | 95 % interval of the median | coverage |",
                "|---|" + "---|" * (len(KL_GRADES) + 3)]
        for method, entry in t2["methods"].items():
            e = entry[name]
            cells = [f"{_num(e['by_klg'][str(g)]['median'])} ({_num(e['by_klg'][str(g)]['mad'])})" for g in KL_GRADES]
            total = e["all"]
            out.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells)
                       + f" | {_num(total['median'])} ({_num(total['mad'])}) | {_ci(total['median_ci95'], _num).strip(' ()')} "
                       f"| {_pct(e['coverage_mean'])} % |")
        counts = next(iter(t2["methods"].values()))[name]["by_klg"] if t2["methods"] else {}
        out.append("| pairs | " + " | ".join(str(counts.get(str(g), {}).get("n", 0)) for g in KL_GRADES)
                   + f" | {t2['knees']} | | |")
        out.append("")
    paper_error = PAPER["table2_fc_median_mm"]
    out += [f"Paper (OAI), overall femoral median: MRIS-S {paper_error['mris-s']:.3f} mm, U-Net {paper_error['unet']:.3f} mm.", "",
            "![error by KL grade](error_by_klg.png)", "", "![test knees](examples.png)", ""]

    from mris.evaluation.report_downstream import table3_markdown

    out += table3_markdown(report.get("table3_downstream"))

    out += ["## Cohort", ""]
    cohort = report.get("cohort")
    if cohort:
        mix = cohort.get("baseline_klg_mix", {})
        out += [f"- {cohort.get('subjects')} subjects, {cohort.get('knee_visits')} knee-visit pairs "
                f"({', '.join(f'{k} {v}' for k, v in cohort.get('pairs_per_split', {}).items())})",
                "- baseline KL0-4: " + " / ".join(f"{100 * mix.get(str(g), 0):.1f}" for g in KL_GRADES) + " %",
                f"- mean FC / TC thickness {cohort.get('mean_fc_mm')} / {cohort.get('mean_tc_mm')} mm; progressors "
                f"{_pct(cohort.get('progressor_share_latent'))} % (progressor label: KL increase within 72 months)", ""]
    else:
        out += ["No `cohort_stats.json` beside the manifest (not a synthetic cohort).", ""]
    card = report["model_card"]
    artefacts = report["artefacts"]
    out += ["## Model and index", "",
            f"- model bundle `{artefacts['model']}` (created {card['created']}, profile {card['profile']}, "
            f"{card['epochs']} epochs, {card['init']})",
            f"- preprocessing: {', '.join(f'{k} {v}' for k, v in card['preprocess'].items())}",
            f"- indexes: {', '.join(f'{v} {p}' for v, p in artefacts['index_versions'].items())}; "
            f"{artefacts['database_rows']} database maps",
            f"- combined model: `{artefacts['combined_model'] or '-'}`; U-Net: `{artefacts['unet'] or '-'}`",
            "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in report["seconds"].items()), ""]
    return "\n".join(out)


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
        ax.plot(np.arange(1, curve.size + 1), 100 * curve, label=f"{label} (R@20 {_pct(row['recall']['R@20'])} %)")
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
    per_knee = report["per_knee"]
    klg = np.array([-1 if g is None else g for g in per_knee["klg"]])
    methods = list(per_knee["mae"])
    figure = _figure(11, 4)
    axes = figure.subplots(1, 2, sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, (name, label) in zip(axes, (("fc", "femoral"), ("tc", "tibial"))):
        for m, method in enumerate(methods):
            values = np.asarray(per_knee["mae"][method][name], np.float64)
            data = [values[(klg == g) & np.isfinite(values)] for g in KL_GRADES]
            positions = [g + (m - (len(methods) - 1) / 2) * width for g in KL_GRADES]
            keep = [i for i, d in enumerate(data) if d.size]
            if not keep:
                continue
            parts = ax.boxplot([data[i] for i in keep], positions=[positions[i] for i in keep], widths=width * 0.9,
                               patch_artist=True, showfliers=False, manage_ticks=False)
            colour = f"C{m}"
            for box in parts["boxes"]:
                box.set_facecolor(colour)
                box.set_alpha(0.6)
            ax.plot([], [], color=colour, lw=6, alpha=0.6, label=METHOD_LABELS[method])
        ax.set_xticks(list(KL_GRADES), [f"KL{g}" for g in KL_GRADES])
        ax.set_title(f"Table 2: {label} MAE per test knee-visit")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("mean absolute error (mm)")
    axes[1].legend(fontsize=8)
    return _png(figure)


def examples_figure(examples) -> bytes:
    """One row per example knee: ROI, then per cartilage truth | MRIS-S | U-Net | |MRIS-S - truth|
    | |U-Net - truth| | MRIS-S SD (panels a method lacks stay empty)."""
    ids = [p for p in examples.pair_ids if p in examples.maps]
    columns = 1 + 2 * 6
    figure = _figure(1.6 * columns, 1.8 * max(1, len(ids)))
    axes = np.atleast_2d(figure.subplots(max(1, len(ids)), columns))
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for r, pair in enumerate(ids):
        row = examples.rows[pair]
        maps = examples.maps[pair]
        axes[r, 0].imshow(examples.roi[pair], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(f"{pair}\nKL{'?' if row.klg is None else row.klg} ROI", fontsize=7)
        column = 1
        for name in ("fc", "tc"):
            truth = maps["mr"][name]
            panels = [(f"{name.upper()} MR", truth, "viridis", THICKNESS_MAX_MM)]
            for method in ("mris-s", "unet"):
                m = maps.get(method, {}).get(name)
                panels.append((f"{name.upper()} {METHOD_LABELS[method]}", m, "viridis", THICKNESS_MAX_MM))
            for method in ("mris-s", "unet"):
                m = maps.get(method, {}).get(name)
                panels.append((f"|{METHOD_LABELS[method]} - MR|", None if m is None else np.abs(m - truth), "magma", ERROR_MAX_MM))
            panels.append((f"{name.upper()} MRIS-S SD", maps.get("mris-s", {}).get(f"{name}_std"), "magma", ERROR_MAX_MM))
            for title, image, cmap, vmax in panels:
                ax = axes[r, column]
                column += 1
                if image is None:
                    ax.set_visible(False)
                    continue
                handle = ax.imshow(np.ma.masked_invalid(image), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
                ax.set_title(title, fontsize=7)
                if r == 0:
                    bar = figure.colorbar(handle, ax=ax, fraction=0.046, pad=0.02)
                    bar.ax.tick_params(labelsize=5)
    return _png(figure)


def knees_csv(report: dict[str, Any]) -> str:
    per_knee = report["per_knee"]
    methods = list(per_knee["mae"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["pair_id", "subject_id", "klg"] + [f"{m}_{n}_{kind}" for m in methods for n in ("fc", "tc")
                                                         for kind in ("mae_mm", "coverage")])
    for i, pair in enumerate(per_knee["pair_ids"]):
        values = []
        for m in methods:
            for n in ("fc", "tc"):
                values += [f"{per_knee['mae'][m][n][i]:.4f}", f"{per_knee['coverage'][m][n][i]:.4f}"]
        writer.writerow([pair, per_knee["subjects"][i], "" if per_knee["klg"][i] is None else per_knee["klg"][i]] + values)
    return buffer.getvalue()


def write_report(out: Path, report: dict[str, Any], examples) -> None:
    """Figures and tables first, ``report.json`` last (its presence means the report is whole)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "recall_at_k.png", recall_figure(report))
    atomic_write_bytes(out / "error_by_klg.png", error_figure(report))
    atomic_write_bytes(out / "examples.png", examples_figure(examples))
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
