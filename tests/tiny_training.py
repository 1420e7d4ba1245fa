"""The tiny training profile and one trained tiny bundle shared by the test modules that need a
real trained model with a localiser (tests/test_training_pipeline.py, tests/test_pacs.py): it is
trained once per test session (conftest's ``trained`` fixture)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mris.training import profiles
from mris.training.profiles import LocaliserProfile

TINY = dataclasses.replace(
    profiles.PROFILES["quick"],
    name="tiny",
    encoder_px=32,
    epochs=2,
    batch_size=8,
    val_fraction=0.3,
    localiser=LocaliserProfile(
        global_input_px=(32, 40),
        refine_px=32,
        refine_mm=64.0,
        offsets_per_knee=2,
        max_images=40,
        global_epochs=6,
        refine_epochs=4,
        batch_size=16,
        negatives_fraction=0.3,
    ),
)


def train_tiny(manifest: Path, out: Path) -> dict:
    """Train both variants of the tiny profile (with its localiser) on ``manifest`` into
    ``out``; returns the training summary."""
    import pytest

    from mris.training.run import TrainRequest, train

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(profiles.PROFILES, "tiny", TINY)
        return train(
            TrainRequest(manifest=manifest, out=out, variant="both", profile="tiny", threads=2)
        )


def any_confidence_copy(bundle: Path, out: Path) -> Path:
    """A copy of a model bundle whose localiser accepts any confidence: the tiny localiser
    trains for seconds and is not confident, and the tests that use it check the wiring
    (card -> localiser -> ROIs), not its accuracy."""
    import shutil

    from mris.model_bundle import load_model_bundle, write_model_card

    shutil.copytree(bundle, out)
    card = load_model_bundle(out).card
    card.localiser.details["config"] = {
        **card.localiser.details.get("config", {}),
        "confidence_threshold": 0.0,
    }
    write_model_card(out, card)
    return out
