"""Which augmentation set the ``quick`` profile uses (docs/TRAINING.md, "Augmentation"): held-out
first-visit recall@5 of the femoral encoder pair after the ``tests/test_training_learns.py``
recipe (100-subject synthetic cohort, 32-px ROIs of 70 mm, the quick optimiser, 30 epochs), once
per augmentation set and training seed. Usage::

    .venv/bin/python benchmarks/measure_augmentation.py [--sets paper,light,none] [--seeds 1]

Run from the repository root; takes about a minute per (set, seed) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", default="paper,light,none")
    parser.add_argument("--seeds", default="1")
    args = parser.parse_args()

    import numpy as np
    import test_training_learns as learns
    from conftest import write_tiny_cohort
    from mris.manifest import read_manifest, write_manifest

    work = Path(tempfile.mkdtemp(prefix="measure-augmentation-"))
    generated = read_manifest(write_tiny_cohort(work / "cohort", subjects=learns.SUBJECTS, seed=learns.COHORT_SEED))
    test_subjects = set(sorted({row.subject_id for row in generated.rows})[-learns.TEST_SUBJECTS:])
    rows = [dataclasses.replace(row, split="test" if row.subject_id in test_subjects else "database")
            for row in generated.rows]
    cohort = write_manifest(work / "cohort" / "split.csv", rows)
    heldout = learns.heldout_first_visits(cohort, work / "heldout")
    base = learns.RECIPE
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.sets.split(","):
            recipe = dataclasses.replace(base, augment=name != "none", augmentation=name if name != "none" else "paper")
            learns.RECIPE, learns.SEED = recipe, seed
            trainer, seconds = learns.train(cohort, work / f"run-{name}-{seed}")
            outcome = learns.held_out_outcome(trainer, heldout, seconds)
            print(f"augmentation {name:<6} seed {seed}: R@5 {outcome.recall['R@5']:.3f} = {outcome.ratio_at_5:.2f}x chance, "
                  f"R@1 {outcome.recall['R@1']:.3f} R@10 {outcome.recall['R@10']:.3f} R@20 {outcome.recall['R@20']:.3f}; "
                  f"loss {outcome.losses[0]:.1f} -> {np.mean(outcome.losses[-5:]):.1f}; {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
