"""Table 3 of ``report.md``: per classifier the rows of every method (accuracy per KL class and
overall, balanced accuracy, progression average precision and ROC AUC, each with its 95 %
subject-bootstrap interval), then each method against the MR maps as paired differences on the
same test knees with their intervals, and what the classifiers were."""

from __future__ import annotations

import math
from typing import Any

from mris.evaluation.report import METHOD_LABELS, PAPER, _num
from mris.evaluation.tables import KLG_CLASSES

PAPER_TABLE3 = (
    f"Paper (OAI, ResNet-18): KLG accuracy {PAPER['table3_klg_accuracy']['mris-s']:.3f} "
    "(MRIS-S) vs "
    f"{PAPER['table3_klg_accuracy']['mr']:.3f} (MR maps); progression AUC "
    f"{PAPER['table3_progression_auc']['mris-s']:.3f} vs "
    f"{PAPER['table3_progression_auc']['mr']:.3f}."
)
CLASSIFIER_TITLES = {
    "resnet18": "ResNet-18 (the paper's classifier)",
    "logistic": "logistic regression on 8 x 8 cell means",
}


def _signed(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.3f}"


def _with_ci(value: float | None, pair, fmt=_num) -> str:
    if not pair or any(v is None or not math.isfinite(v) for v in pair):
        return fmt(value)
    return f"{fmt(value)} ({fmt(pair[0])} to {fmt(pair[1])})"


def _label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _settings_line(classifier: str, settings: dict[str, Any]) -> str:
    if classifier == "logistic":
        s = settings.get("logistic", {})
        return (
            f"Logistic regression (scikit-learn) on {s.get('features', '8 x 8 cell means')}, "
            "standardised, C from "
            f"{s.get('C_grid')} by {s.get('cv_folds')}-fold GroupKFold over downstream "
            "subjects (lowest held-out log-loss)."
        )
    s = settings.get("resnet18", {})
    parts = []
    for task in ("klg", "progression"):
        t = s.get(task)
        if not t:
            continue
        size = (
            "the map grid"
            if t.get("map_px") is None
            else f"{t['map_px'][0]} x {t['map_px'][1]} cell means per map"
        )
        parts.append(
            f"{task}: {t['epochs']} epochs, batch {t['batch_size']}, AdamW lr {t['lr']:g} "
            "(weight decay "
            f"{t['weight_decay']:g}), x{t['gamma']:g} every {t['step_epochs']} epochs, {size}"
        )
    weights = s.get("weights")
    return (
        f"ResNet-18 (torchvision, profile {s.get('profile')}, device {s.get('device')}), fc "
        "above tc as one image "
        f"(NaN -> 0) repeated to 3 channels, balanced class weights; "
        + ("; ".join(parts))
        + "; "
        + (
            f"fine-tuned from `{weights}` (conv1, bn1, layer1 frozen)."
            if weights
            else "from random initialisation (no pretrained weights given), every layer trained."
        )
        + (
            f" The {s.get('profile')} profile's classifier is shorter and smaller than the "
            "paper's (30 epochs,"
            " lr 1e-5 / 1e-4, full maps): its numbers are not the paper's setting."
            if s.get("profile") != "paper"
            else ""
        )
    )


def table3_markdown(t3: dict[str, Any] | None) -> list[str]:
    out = ["## Table 3: downstream tasks (train on `downstream`, test on `test`)", ""]
    if not t3 or not any(c["methods"] for c in t3.get("classifiers", {}).values()):
        return out + ["Not computed: the manifest has no usable `downstream` split.", ""]
    c = t3["counts"]
    prevalence = next(
        (
            e["progression"]["prevalence"]
            for entry in t3["classifiers"].values()
            for e in entry["methods"].values()
            if "progression" in e
        ),
        float("nan"),
    )
    out += [
        f"KL grade: {c['klg']['train']} training and {c['klg']['test']} test knee-visit pairs "
        f"({c['klg'].get('test_subjects', '?')} test subjects), classes "
        f"{', '.join(KLG_CLASSES)}; progression "
        "(KL grade rises within 72 months): each knee's first visit, "
        f"{c['progression']['train']} training and "
        f"{c['progression']['test']} test knees (test prevalence "
        f"{'-' if not math.isfinite(prevalence) else f'{100 * prevalence:.1f}'} %). Metrics "
        "from scikit-learn; "
        "95 % intervals from resampling test subjects.",
        "",
    ]
    for classifier, entry in t3["classifiers"].items():
        if not entry["methods"]:
            continue
        out += [
            f"### {CLASSIFIER_TITLES.get(classifier, classifier)} "
            f"({entry.get('seconds', 0):.0f} s)",
            "",
            _settings_line(classifier, t3.get("settings", {})),
            "",
            "| maps used | KLG accuracy | KLG balanced accuracy | "
            + " | ".join(f"{n} accuracy" for n in KLG_CLASSES)
            + " | progression AP | progression ROC AUC |",
            "|---|---|---|" + "---|" * len(KLG_CLASSES) + "---|---|",
        ]
        for method, values in entry["methods"].items():
            klg, prog = values.get("klg", {}), values.get("progression", {})
            per_class = klg.get("class_accuracy", {})
            per_class_ci = klg.get("class_accuracy_ci95", {})
            out.append(
                f"| {_label(method)} | {_with_ci(klg.get('accuracy'), klg.get('accuracy_ci95'))} | "
                f"{_with_ci(klg.get('balanced_accuracy'), klg.get('balanced_accuracy_ci95'))} | "
                + " | ".join(_with_ci(per_class.get(n), per_class_ci.get(n)) for n in KLG_CLASSES)
                + " | "
                f"{_with_ci(prog.get('average_precision'), prog.get('average_precision_ci95'))} "
                "| "
                f"{_with_ci(prog.get('roc_auc'), prog.get('roc_auc_ci95'))} |"
            )
        paired = entry.get("paired_vs_mr") or {}
        if paired:
            out += [
                "",
                "Each method minus the MR maps, paired on the same test knees (difference "
                "and 95 % interval of "
                "the difference from the same subject resamples; an interval that holds 0 "
                "shows no difference "
                "this test split can resolve):",
                "",
                "| maps used | KLG accuracy | KLG balanced accuracy | progression AP | "
                "progression ROC AUC |",
                "|---|---|---|---|---|",
            ]
            for method, tasks in paired.items():
                cells = []
                for task, name in (
                    ("klg", "accuracy"),
                    ("klg", "balanced_accuracy"),
                    ("progression", "average_precision"),
                    ("progression", "roc_auc"),
                ):
                    d = (tasks.get(task) or {}).get(name) or {}
                    cells.append(_with_ci(d.get("difference"), d.get("ci95"), _signed))
                out.append(f"| {_label(method)} - MR | " + " | ".join(cells) + " |")
        out.append("")
    out += [PAPER_TABLE3, ""]
    return out
