"""The synthesis NaN rules (``majority`` and ``all``, ``mris.synthesis``) on a bundle's test split:
how much of the true cartilage each covers and its error where it covers.

Per test knee-visit and cartilage (fc, tc), through ``Pipeline.search`` once and
``mris.pipeline.synthesize_maps`` once per rule (the service's code), on the map grid (no resize):

- coverage: the share of the true map's cartilage pixels the synthesized map covers;
- MAE: mean absolute error (mm) over the pixels both the true and the synthesized map cover
  (``mris.evaluation.metrics.map_error``, Table 2's per-pixel error before its resize);
- outside: the share of the synthesized map's pixels where the true map has no cartilage (what
  a rule claims wrongly; coverage and MAE do not see it);
- for ``majority`` also the MAE over the true-cartilage pixels only it covers (where ``all`` is
  NaN): where every neighbour has cartilage the two rules give the same value, so this is what
  the extra pixels cost.

Figures are means over knee-visits (and the median of the MAE). ROIs: the manifest's keypoints
(``--rois keypoints``, default) or the localiser as the service finds knees (``--rois localiser``,
falling back to keypoints where it finds nothing), via ``mris.evaluation.methods.collect_rois``.

    python benchmarks/bench_nan_rule.py --model /work/demo-run/model \
        --index /work/demo-run/index --manifest /work/demo-run/cohort/manifest.csv
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mris.constants import CARTILAGES
from mris.evaluation.methods import collect_rois
from mris.evaluation.metrics import map_error
from mris.manifest import read_manifest
from mris.pipeline import Pipeline, synthesize_maps
from mris.synthesis import NAN_RULES
from mris.thickness import load_thickness_map

BATCH = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rois", choices=("keypoints", "localiser"), default="keypoints")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="First N knee-visits only (0: all).")
    parser.add_argument("--json", help="Also write the figures here.")
    args = parser.parse_args()

    started = time.perf_counter()
    pipeline = Pipeline.load(
        args.model, args.index, variant="separate", device="cpu", intra_op_threads=args.threads
    )
    manifest = read_manifest(args.manifest)
    rows = manifest.select([args.split])
    if args.limit:
        rows = rows[: args.limit]
    rois = collect_rois(pipeline, manifest, rows, use_localiser=args.rois == "localiser")
    print(
        f"{len(rois.rows)} {args.split} knee-visits with ROIs from the {args.rois} "
        f"(skipped: { ({r: len(p) for r, p in rois.skipped.items()}) }, fallbacks: "
        f"{rois.keypoint_fallbacks})"
    )

    per = {
        rule: {
            c: {"coverage": [], "mae": [], "outside": [], "extra_mae": [], "extra_share": []}
            for c in CARTILAGES
        }
        for rule in NAN_RULES
    }
    for start in range(0, len(rois.rows), BATCH):
        batch_rows, batch_rois = rois.rows[start : start + BATCH], rois.rois[start : start + BATCH]
        hits = pipeline.search(batch_rois, args.k)
        answers = {
            rule: [synthesize_maps(h, pipeline.index, args.k, rule) for h in hits]
            for rule in NAN_RULES
        }
        for i, row in enumerate(batch_rows):
            for name in CARTILAGES:
                truth = load_thickness_map(manifest.resolve_path(getattr(row, f"{name}_path")))
                strict = answers["all"][i].maps_mm[name]
                for rule in NAN_RULES:
                    predicted = answers[rule][i].maps_mm[name]
                    mae, coverage = map_error(predicted, truth)
                    figures = per[rule][name]
                    figures["coverage"].append(coverage)
                    figures["mae"].append(mae)
                    claimed = np.isfinite(predicted)
                    figures["outside"].append(
                        (claimed & np.isnan(truth)).sum() / max(claimed.sum(), 1)
                    )
                    extra = np.isfinite(predicted) & np.isnan(strict) & np.isfinite(truth)
                    figures["extra_share"].append(extra.sum() / max(np.isfinite(truth).sum(), 1))
                    if extra.any():
                        figures["extra_mae"].append(
                            float(np.abs(predicted[extra] - truth[extra]).mean())
                        )

    summary = {}
    print(f"\nk = {args.k}, {len(rois.rows)} knee-visits, {time.perf_counter() - started:.0f} s")
    print(
        f"{'rule':<9} {'map':<3} {'coverage':>9} {'MAE mm':>8} {'median':>8} {'outside':>8} "
        f"{'extra px':>9} {'MAE extra':>10}"
    )
    for rule in NAN_RULES:
        for name in CARTILAGES:
            f = per[rule][name]
            entry = {
                "coverage_mean": float(np.mean(f["coverage"])),
                "mae_mean": float(np.nanmean(f["mae"])),
                "mae_median": float(np.nanmedian(f["mae"])),
                "outside_mean": float(np.mean(f["outside"])),
                "extra_share_mean": float(np.mean(f["extra_share"])),
                "extra_mae_mean": float(np.mean(f["extra_mae"])) if f["extra_mae"] else None,
            }
            summary.setdefault(rule, {})[name] = entry
            extra_mae = (
                f"{entry['extra_mae_mean']:.3f}" if entry["extra_mae_mean"] is not None else "-"
            )
            print(
                f"{rule:<9} {name:<3} {100 * entry['coverage_mean']:>8.1f}% "
                f"{entry['mae_mean']:>8.3f} "
                f"{entry['mae_median']:>8.3f} {100 * entry['outside_mean']:>7.1f}% "
                f"{100 * entry['extra_share_mean']:>8.1f}% {extra_mae:>10}"
            )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"k": args.k, "knee_visits": len(rois.rows), "rois": args.rois, "figures": summary},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
