"""Table 3's ResNet-18: DESIGN.md's optimiser and schedule, the reference's input arrangement, and
that it learns a label the maps carry and not one they do not (tiny maps, few epochs)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from conftest import require

require("torch")

import torch  # noqa: E402

from mris.training.downstream import (  # noqa: E402
    arrange,
    build_classifier,
    fit_predict,
    make_optimiser,
    settings_for,
)


def test_paper_settings_match_design():
    klg, progression = settings_for("klg", "paper"), settings_for("progression", "paper")
    assert (klg.epochs, klg.batch_size, klg.lr, klg.step_epochs, klg.gamma) == (
        30,
        64,
        1e-5,
        10,
        0.2,
    )
    assert progression.lr == 1e-4 and progression.epochs == 30 and klg.map_px is None
    optimiser, scheduler = make_optimiser(build_classifier(4), progression)
    assert isinstance(optimiser, torch.optim.AdamW) and optimiser.defaults["weight_decay"] == 0.1
    rates = []
    for _ in range(30):
        rates.append(optimiser.param_groups[0]["lr"])
        optimiser.step()
        scheduler.step()
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-4)
    assert rates[10] == pytest.approx(2e-5) and rates[20] == pytest.approx(4e-6)
    quick = settings_for("klg", "quick", epochs=3)
    assert quick.epochs == 3 and quick.step_epochs == 2 and quick.map_px == (24, 24)
    assert settings_for("klg", "quick").epochs == 4
    # The reference evaluation's profile trains its encoders at 96 px but keeps the quick
    # classifier.
    assert settings_for("progression", "reference") == settings_for("progression", "quick")
    with pytest.raises(ValueError, match="profile must be one of paper, quick, reference"):
        settings_for("klg", "other")


def test_input_is_fc_above_tc_with_nan_as_zero_in_three_channels():
    maps = np.zeros((1, 2, 4, 3), np.float32)
    maps[0, 0] = 1.0
    maps[0, 1] = 2.0
    maps[0, 1, 0, 0] = np.nan
    image = arrange(maps)
    assert image.shape == (1, 3, 8, 3)
    assert torch.equal(image[0, 0], image[0, 2])
    assert (image[0, 0, :4] == 1).all() and image[0, 0, 4, 0] == 0 and image[0, 0, 5, 0] == 2


def test_local_weights_freeze_the_stem_as_the_reference(tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "resnet18.pt"
    torch.save(resnet18(weights=None).state_dict(), path)
    model = build_classifier(2, path)
    assert not model.conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    assert model.layer2[0].conv1.weight.requires_grad and model.fc.out_features == 2
    assert all(
        p.requires_grad for p in build_classifier(2).parameters()
    )  # from scratch: all layers learn


def _problem(n: int, informative: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    maps = rng.normal(2.0, 0.3, (n, 2, 8, 8)).astype(np.float32)
    if informative:
        maps[labels == 1, 0, :4] += 1.5  # progressors: a thicker upper femoral half
    return maps, labels


def test_a_label_the_maps_carry_is_learned_and_one_they_do_not_is_not():
    torch.set_num_threads(2)
    settings = replace(
        settings_for("progression", "quick"), batch_size=8
    )  # 4 epochs at the quick lr
    for informative, check in ((True, lambda a: a >= 0.9), (False, lambda a: a <= 0.7)):
        x_train, y_train = _problem(48, informative, 1)
        x_test, y_test = _problem(64, informative, 2)
        if not informative:
            y_test = np.random.default_rng(3).permutation(y_test)
        probabilities = fit_predict(x_train, y_train, x_test, 2, settings, seed=0)
        accuracy = float(np.mean(probabilities.argmax(axis=1) == y_test))
        assert check(accuracy), (informative, accuracy)


def test_deterministic_from_the_seed():
    settings = replace(settings_for("klg", "quick", epochs=1), batch_size=4)
    x, y = _problem(8, True, 4)
    first, second = (fit_predict(x, y, x, 4, settings, seed=5) for _ in range(2))
    assert first.shape == (8, 4) and np.allclose(first.sum(axis=1), 1.0)
    assert np.array_equal(first, second)


def test_every_training_profile_names_its_classifier_setting_in_one_place() -> None:
    from mris.evaluation.downstream import CLASSIFIER_SETTINGS, classifier_map_px
    from mris.training.profiles import PROFILES

    assert set(CLASSIFIER_SETTINGS) == set(PROFILES)
    for name in PROFILES:
        assert classifier_map_px(name) == settings_for("klg", name).map_px
