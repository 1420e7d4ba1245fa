"""Training learns (issue 13, item 8), proven on a small synthetic cohort with the real pieces:
the cohort generator's DICOMs and maps, the shared ROI / thickness preprocessing through the
training cache, the real ``RegionTrainer`` (no mocks of our own code).

What is proven, for the femoral (``fc``) encoder pair trained with one fixed recipe (below):

1. Quick training lowers the loss (eq. 3, batch sum: the mean of the last 5 epochs is under half
   the first epoch's) and reaches held-out first-visit recall@5 of at least 3x chance. Held out:
   the ``test`` subjects, none of whose knees is trained on; queries are each test knee's
   first-visit radiograph ROI, the gallery those knee-visits' femoral maps (DESIGN.md, Table 1),
   chance recall@5 = 5 / gallery. Embeddings come from the trained torch encoders (last epoch)
   through ``RegionTrainer.embed``, the trainer's own validation path; recall from
   ``mris.evaluation.metrics.recall_at_k``.
2. A left/right flip mismatch between radiograph ROI and map breaks it: the same trained encoders,
   given the held-out ROIs cut from a manifest whose sides are swapped (LEFT <-> RIGHT, keypoints
   kept, so every ROI is flipped against its map), fall under the criterion and lose at least half
   their recall@5 on the same knees. This is the mismatch met at evaluation; training on swapped
   sides and evaluating as served is its mirror image (the cohort draws both knees alike) and
   would cost a second 50-s training, so it is not run here.
3. A sign error in the loss breaks it: the same recipe with ``loss_fn`` returning minus eq. 3
   (``RegionTrainer.loss_fn``, the trainer's one seam for this) makes eq. 3 rise instead of fall
   from the first epochs, so the loss half of the criterion fails; it stops after
   ``SIGN_EPOCHS`` epochs (``fit(stop_after_epoch=...)``) to keep the module lean, and its recall
   stays under the criterion.

The recipe (the cheapest found that passes with margin on 2 CPU cores): 100 subjects (seed 5,
32-px maps), the last 30 subject ids as ``test`` (60 knees in the gallery, chance R@5 8.3 %),
the other 70 as ``database`` (10 % of those held out for the trainer's per-epoch validation, 126
training knees); encoder input 32 px; ROI 70 mm instead of the served 140 mm, so that 32 px still
resolve the joint space (2.2 mm per px); the ``quick`` profile's optimiser (AdamW 1e-3) and
augmentation, batch 32, 30 epochs, StepLR at 20; training seed 1.

Measured with ROI normalisation version 2 (minus the ROI minimum) and the paper's MONAI
augmentation (issue 13; torch float32, deterministic; the machine heavily loaded by other jobs):

- correct: R@5 0.517 = 6.2x chance (R@1 0.133, R@10 0.717, R@20 0.883); loss 90.5 (epoch 1)
  -> 18.0 (mean of the last 5 epochs).
- flip mismatch: R@5 0.083 = 1.0x chance (R@1 0.017, R@10 0.317, R@20 0.55).
- sign error, 6 epochs: R@5 0.000 = 0.0x chance; eq. 3 101 -> 302.
- the ``light`` augmentation set instead (docs/TRAINING.md): correct 5.4x, flip mismatch 2.6x
  (only just under the criterion), training loss 87 -> 2.5: it overfits.

Before issue 13 (percentile-only normalisation, a hand-rolled milder augmentation; load 1.2-1.8,
the same numbers on each of 3 runs in a row): correct 6.4x, flip mismatch 1.2x, sign error 1.0x
(eq. 3 97 -> 255; all 30 epochs, training seed 0: 0.2x, eq. 3 101 -> 493);
- other training seeds, same recipe: seed 0 correct 5.2x, flip mismatch 2.8x (under 3x, but
  only just: why the test uses seed 1); seed 2 correct 6.4x, flip about 1.2x (measured with
  the ROI array mirrored rather than re-cut, outside this module).
- cheaper recipes fell short: 140-mm ROI without augmentation, 25 epochs: 1.6x; 70-mm ROI with
  augmentation, 25 epochs at a constant lr: 2.6x.
- time (before issue 13, idle): cohort ~27 s, correct training ~52 s (about 40 % of it outside
  the steps: per-epoch validation, checkpoints, curves), flip evaluation < 1 s, sign-error run
  ~12 s: the module 92-94 s. The MONAI augmentation adds ~15 ms per image on a loaded core.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require

torch = require("torch")

# after require(): without torch the module is skipped (fails in CI)
from mris.constants import PreprocessConfig  # noqa: E402
from mris.evaluation.metrics import recall_at_k  # noqa: E402
from mris.manifest import Manifest, read_manifest, write_manifest  # noqa: E402
from mris.training import profiles  # noqa: E402

SUBJECTS = 100
COHORT_SEED = 5
TEST_SUBJECTS = 30
REGION = "fc"
SEED = 1
CONFIG = PreprocessConfig(encoder_px=32, roi_size_mm=70.0)
RECIPE = dataclasses.replace(
    profiles.PROFILES["quick"],
    name="learns",
    encoder_px=CONFIG.encoder_px,
    epochs=30,
    batch_size=32,
    step_size=20,
    val_fraction=0.1,
)
SIGN_EPOCHS = 6  # the sign error shows in eq. 3 from the first epochs (see the test)
CRITERION = 3.0  # held-out first-visit recall@5 >= 3x chance
SWAP_SIDE = {"LEFT": "RIGHT", "RIGHT": "LEFT"}


@dataclasses.dataclass
class Outcome:
    losses: list[float]  # what the trainer minimised, per epoch
    recall: dict[str, float]  # held-out first visits
    gallery: int
    seconds: float

    @property
    def chance_at_5(self) -> float:
        return 5 / self.gallery

    @property
    def ratio_at_5(self) -> float:
        return self.recall["R@5"] / self.chance_at_5


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The generated cohort with our split: the last ``TEST_SUBJECTS`` subject ids are ``test``,
    the others ``database``."""
    from conftest import write_tiny_cohort

    root = tmp_path_factory.mktemp("learns")
    generated = read_manifest(write_tiny_cohort(root, subjects=SUBJECTS, seed=COHORT_SEED))
    test_subjects = set(sorted({row.subject_id for row in generated.rows})[-TEST_SUBJECTS:])
    rows = [
        dataclasses.replace(row, split="test" if row.subject_id in test_subjects else "database")
        for row in generated.rows
    ]
    return write_manifest(root / "split.csv", rows)


def heldout_first_visits(manifest_path: Path, cache_dir: Path, swap_sides: bool = False):
    """Cached inputs of each test knee's first visit. ``swap_sides``: the radiograph rows carry
    the other side's label (keypoints kept), so each ROI is flipped against its map."""
    from mris.training.cache import build_cache
    from mris.training.sampler import first_visits

    manifest = read_manifest(manifest_path)
    test = manifest.select(["test"])
    first = [
        test[i] for i in first_visits([r.knee_id for r in test], [r.visit_month for r in test])
    ]
    if swap_sides:
        first = [
            dataclasses.replace(
                row,
                side=SWAP_SIDE[row.side],
                radiograph_path=str(manifest.resolve_path(row.radiograph_path)),
                fc_path=str(manifest.resolve_path(row.fc_path)),
                tc_path=str(manifest.resolve_path(row.tc_path)),
            )
            for row in first
        ]
        manifest_path = write_manifest(cache_dir / "swapped-sides.csv", first)
        manifest = read_manifest(manifest_path)
        first = manifest.rows
    return build_cache(manifest_path, manifest, first, CONFIG, cache_dir, ["radiograph", REGION])


def train(manifest_path: Path, work: Path, loss_fn=None, stop_after_epoch: int | None = None):
    """The recipe's ``RegionTrainer`` after ``fit()`` (last epoch's encoders) and its seconds."""
    from mris.training.cache import build_cache
    from mris.training.run import split_validation
    from mris.training.sampler import first_visits
    from mris.training.trainer import RegionData, RegionTrainer, set_determinism

    started = time.perf_counter()
    set_determinism(SEED, threads=2)
    manifest: Manifest = read_manifest(manifest_path)
    database = manifest.select(["database"])
    cache = build_cache(
        manifest_path, manifest, database, CONFIG, work / "cache", ["radiograph", REGION]
    )
    train_pos, val_pos = split_validation(database, RECIPE.val_fraction, SEED)
    knees = [row.knee_id for row in database]
    months = [row.visit_month for row in database]
    val_first = [
        val_pos[i] for i in first_visits([knees[p] for p in val_pos], [months[p] for p in val_pos])
    ]
    data = RegionData(
        radiographs=cache["radiograph"],
        thickness=cache[REGION],
        train_rows=train_pos,
        train_knees=[knees[p] for p in train_pos],
        val_rows=val_first,
    )
    extra = {} if loss_fn is None else {"loss_fn": loss_fn}
    trainer = RegionTrainer(
        f"separate-{REGION}",
        data,
        RECIPE,
        work / "run",
        torch.device("cpu"),
        seed=SEED,
        log=lambda message: None,
        **extra,
    )
    trainer.fit(stop_after_epoch=stop_after_epoch)
    return trainer, time.perf_counter() - started


def held_out_outcome(trainer, heldout, seconds: float) -> Outcome:
    everyone = list(range(len(heldout.rows)))
    queries = trainer.embed(trainer.f, heldout["radiograph"], everyone)
    keys = trainer.embed(trainer.g, heldout[REGION], everyone)
    return Outcome(
        losses=[record["loss"] for record in trainer.history],
        recall=recall_at_k(queries @ keys.T),
        gallery=len(everyone),
        seconds=seconds,
    )


@pytest.fixture(scope="module")
def correct(cohort, tmp_path_factory):
    return train(cohort, tmp_path_factory.mktemp("correct"))


def report(label: str, outcome: Outcome) -> str:
    return (
        f"{label}: R@5 {outcome.recall['R@5']:.3f} = {outcome.ratio_at_5:.2f}x chance "
        f"({outcome.chance_at_5:.3f}, gallery {outcome.gallery}); recall {outcome.recall}; "
        f"loss {outcome.losses[0]:.1f} -> {np.mean(outcome.losses[-5:]):.1f}; "
        f"{outcome.seconds:.0f} s"
    )


def test_quick_training_lowers_the_loss_and_retrieves_held_out_knees(cohort, correct, tmp_path):
    trainer, seconds = correct
    outcome = held_out_outcome(trainer, heldout_first_visits(cohort, tmp_path), seconds)
    print(report("correct", outcome))
    assert np.mean(outcome.losses[-5:]) < 0.5 * outcome.losses[0], outcome.losses
    assert outcome.ratio_at_5 >= CRITERION, report("correct", outcome)


def test_a_left_right_flip_mismatch_between_roi_and_map_fails_the_criterion(
    cohort, correct, tmp_path
):
    trainer, seconds = correct
    matched = held_out_outcome(trainer, heldout_first_visits(cohort, tmp_path / "matched"), seconds)
    outcome = held_out_outcome(
        trainer, heldout_first_visits(cohort, tmp_path / "swapped", swap_sides=True), seconds
    )
    print(report("flip mismatch", outcome))
    assert outcome.ratio_at_5 < CRITERION, report("flip mismatch", outcome)
    # paired (same encoders, same knees): the mismatch loses at least half of the recall
    assert outcome.recall["R@5"] <= 0.5 * matched.recall["R@5"], (outcome.recall, matched.recall)


def test_a_sign_error_in_the_loss_fails_the_criterion(cohort, tmp_path):
    from mris.training.losses import triplet_loss

    def wrong_sign(radiograph_emb, thickness_emb, margin):
        return -triplet_loss(radiograph_emb, thickness_emb, margin)

    trainer, seconds = train(cohort, tmp_path, loss_fn=wrong_sign, stop_after_epoch=SIGN_EPOCHS)
    outcome = held_out_outcome(trainer, heldout_first_visits(cohort, tmp_path), seconds)
    print(report("sign error", outcome))
    paper_loss = [-value for value in outcome.losses]  # what eq. 3 measured along the way
    assert np.mean(paper_loss[-3:]) > paper_loss[0], (
        paper_loss
    )  # the loss half of the criterion fails
    assert outcome.ratio_at_5 < CRITERION, report("sign error", outcome)
