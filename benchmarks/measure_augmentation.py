"""Which augmentation set the ``quick`` profile uses (docs/TRAINING.md, "Augmentation"): held-out
first-visit recall@5 of the femoral encoder pair after the ``tests/test_training_learns.py``
recipe (100-subject synthetic cohort, 32-px ROIs of 70 mm, the quick optimiser, 30 epochs), once
per augmentation set and training seed. Usage::

    .venv/bin/python benchmarks/measure_augmentation.py [--sets paper,light,none] [--seeds 1]

Run from the repository root; takes about a minute per (set, seed) on 2 idle CPU cores.
``--checkpoint SET:SEED:PATH`` (repeatable) instead evaluates a copy of a run's ``last.pt`` (the
same recipe with that set and training seed, stopped at whatever epoch it holds), so two sets can
be compared at equal epochs when full runs do not fit the time available.
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
    parser.add_argument("--checkpoint", action="append", default=[])
    parser.add_argument(
        "--work", type=Path, help="a previous run's folder: reuse its cohort and caches"
    )
    args = parser.parse_args()

    import numpy as np
    import test_training_learns as learns
    from conftest import write_tiny_cohort

    from mris.manifest import read_manifest, write_manifest

    work = args.work or Path(tempfile.mkdtemp(prefix="measure-augmentation-"))
    cohort = work / "cohort" / "split.csv"
    if not cohort.is_file():
        generated = read_manifest(
            write_tiny_cohort(work / "cohort", subjects=learns.SUBJECTS, seed=learns.COHORT_SEED)
        )
        test_subjects = set(
            sorted({row.subject_id for row in generated.rows})[-learns.TEST_SUBJECTS :]
        )
        rows = [
            dataclasses.replace(
                row, split="test" if row.subject_id in test_subjects else "database"
            )
            for row in generated.rows
        ]
        cohort = write_manifest(cohort, rows)
    heldout = learns.heldout_first_visits(cohort, work / "heldout")
    base = learns.RECIPE
    for spec in args.checkpoint:
        name, seed, path = spec.split(":", 2)
        evaluate_checkpoint(learns, cohort, work, heldout, name, int(seed), Path(path))
    if args.checkpoint:
        return
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in args.sets.split(","):
            recipe = dataclasses.replace(
                base, augment=name != "none", augmentation=name if name != "none" else "paper"
            )
            learns.RECIPE, learns.SEED = recipe, seed
            trainer, seconds = learns.train(cohort, work / f"run-{name}-{seed}")
            outcome = learns.held_out_outcome(trainer, heldout, seconds)
            print(
                f"augmentation {name:<6} seed {seed}: R@5 {outcome.recall['R@5']:.3f} = "
                f"{outcome.ratio_at_5:.2f}x chance, "
                f"R@1 {outcome.recall['R@1']:.3f} R@10 {outcome.recall['R@10']:.3f} R@20 "
                f"{outcome.recall['R@20']:.3f}; "
                f"loss {outcome.losses[0]:.1f} -> {np.mean(outcome.losses[-5:]):.1f}; "
                f"{seconds:.0f} s",
                flush=True,
            )


def evaluate_checkpoint(
    learns, cohort: Path, work: Path, heldout, name: str, seed: int, path: Path
) -> None:
    """``learns.train``'s trainer without ``fit``, its state from ``path``; held-out recall."""
    import numpy as np
    import torch

    from mris.manifest import read_manifest
    from mris.training.cache import build_cache
    from mris.training.run import split_validation
    from mris.training.sampler import first_visits
    from mris.training.trainer import RegionData, RegionTrainer

    recipe = dataclasses.replace(
        learns.RECIPE, augment=name != "none", augmentation=name if name != "none" else "paper"
    )
    manifest = read_manifest(cohort)
    database = manifest.select(["database"])
    cache = build_cache(
        cohort, manifest, database, learns.CONFIG, work / "cache", ["radiograph", learns.REGION]
    )
    train_pos, val_pos = split_validation(database, recipe.val_fraction, seed)
    knees = [row.knee_id for row in database]
    months = [row.visit_month for row in database]
    val_first = [
        val_pos[i] for i in first_visits([knees[p] for p in val_pos], [months[p] for p in val_pos])
    ]
    data = RegionData(
        radiographs=cache["radiograph"],
        thickness=cache[learns.REGION],
        train_rows=train_pos,
        train_knees=[knees[p] for p in train_pos],
        val_rows=val_first,
    )
    trainer = RegionTrainer(
        f"separate-{learns.REGION}",
        data,
        recipe,
        work / f"eval-{name}-{seed}",
        torch.device("cpu"),
        seed=seed,
        log=lambda message: None,
    )
    trainer.load(path)
    outcome = learns.held_out_outcome(trainer, heldout, 0.0)
    print(
        f"augmentation {name:<6} seed {seed} epoch {trainer.epoch}: R@5 "
        f"{outcome.recall['R@5']:.3f} = "
        f"{outcome.ratio_at_5:.2f}x chance, R@1 {outcome.recall['R@1']:.3f} R@10 "
        f"{outcome.recall['R@10']:.3f} "
        f"R@20 {outcome.recall['R@20']:.3f}; loss {outcome.losses[0]:.1f} -> "
        f"{np.mean(outcome.losses[-3:]):.1f} "
        "(mean of the last 3 epochs)",
        flush=True,
    )


if __name__ == "__main__":
    main()
