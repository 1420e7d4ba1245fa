"""Table 3's cost on a cohort: the classifiers of every method on the true maps.

    python benchmarks/bench_table3.py --manifest mris-demo/cohort/manifest.csv [--rows 7]
           [--profile quick] [--classifiers resnet18,logistic] [--threads 2] [--bootstrap 1000]

The cost of Table 3 does not depend on which maps a method gives, only on how many rows there
are, so the MR maps stand in for every row: ``--rows 7`` times (MR, MRIS-C, MRIS-S, U-Net,
pix2pix, mean map, oracle). Prints the seconds per classifier, the load average, and the MR row's
numbers (the first row is the real MR row). On a shared machine the CPU seconds are the figure
to compare (wall = CPU / threads when the cores are free).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from mris.evaluation.downstream import SplitMaps, classifier_map_px, downstream_table
from mris.manifest import read_manifest
from mris.thickness import load_thickness_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=7)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--classifiers", default="resnet18,logistic")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    manifest = read_manifest(args.manifest)
    classifiers = args.classifiers.split(",")
    splits = {}
    for split in ("downstream", "test"):
        rows = manifest.select([split])
        maps = SplitMaps(
            map_px=classifier_map_px(args.profile) if "resnet18" in classifiers else None
        )
        maps.rows.extend(rows)
        fc = [load_thickness_map(manifest.resolve_path(r.fc_path)) for r in rows]
        tc = [load_thickness_map(manifest.resolve_path(r.tc_path)) for r in rows]
        for row in range(args.rows):
            maps.add("mr" if row == 0 else f"copy{row}", fc, tc)
        splits[split] = maps
    started, cpu_started = time.perf_counter(), time.process_time()
    table = downstream_table(
        splits["downstream"],
        splits["test"],
        list(splits["test"].features),
        args.bootstrap,
        0,
        classifiers=classifiers,
        profile=args.profile,
        epochs=args.epochs,
        threads=args.threads,
    )
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    print(f"rows {args.rows}, counts {table['counts']}")
    for name, entry in table["classifiers"].items():
        mr = entry["methods"]["mr"]
        print(
            f"{name}: {entry['seconds']:.0f} s; MR KLG accuracy {mr['klg']['accuracy']:.3f} "
            f"balanced {mr['klg']['balanced_accuracy']:.3f} per class "
            f"{mr['klg']['class_accuracy']}; "
            f"progression AP {mr['progression']['average_precision']:.3f} AUC "
            f"{mr['progression']['roc_auc']:.3f}"
        )
    print(
        f"total {total:.0f} s wall, {cpu:.0f} s CPU (all threads of this process); load "
        f"average {os.getloadavg()}; settings {table['settings'].get('resnet18')}"
    )


if __name__ == "__main__":
    main()
