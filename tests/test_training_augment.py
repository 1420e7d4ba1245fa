"""training.augment: the reference's MONAI augmentation, its probabilities and ranges, and
determinism (a pure function of the seed triple)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from conftest import require

torch = require("torch")
require("monai")

# after require(): without torch and monai the module is skipped (fails in CI)
from monai.transforms import RandAdjustContrast, RandAffine, RandGaussianNoise  # noqa: E402

from mris.training.augment import (  # noqa: E402
    AUGMENTATIONS,
    AugmentConfig,
    augment_image,
    augment_radiographs,
    build_transforms,
    image_seeds,
)
from mris.training.profiles import PROFILES, TrainProfile  # noqa: E402
from mris.training.trainer import batch_generator  # noqa: E402

PAPER = AUGMENTATIONS["paper"]
DRAWS = 1500


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))  # ~1e-5 two-sided


def test_the_paper_set_is_the_reference_transforms():
    affine, noise, contrast = build_transforms(PAPER).transforms
    assert isinstance(affine, RandAffine) and isinstance(noise, RandGaussianNoise)
    assert isinstance(contrast, RandAdjustContrast)
    assert (affine.prob, noise.prob, contrast.prob) == (0.8, 0.5, 0.5)
    assert affine.rand_affine_grid.rotate_range == pytest.approx((math.pi / 12, math.pi / 12))
    assert affine.padding_mode == "border"
    for unused in ("shear_range", "translate_range", "scale_range"):
        assert all(value is None for value in getattr(affine.rand_affine_grid, unused))
    assert (noise.mean, noise.std, noise.sample_std) == (0.0, 0.1, True)
    assert tuple(contrast.gamma) == (0.5, 4.5)


@pytest.fixture(scope="module")
def paper_draws():
    """Per draw: which transforms fired and their parameters (from the MONAI objects)."""
    transforms = build_transforms(PAPER)
    affine, noise, contrast = transforms.transforms
    image = torch.rand(1, 16, 16)
    draws = []
    for seed in image_seeds(batch_generator(3, 1, 0), DRAWS):
        augment_image(image, int(seed), PAPER)
        draws.append(
            {
                "affine": affine._do_transform,
                "angle": float(affine.rand_affine_grid.rotate_params[0])
                if affine._do_transform
                else None,
                "noise": noise._do_transform,
                "noise_std": float(np.std(noise.noise)) if noise._do_transform else None,
                "contrast": contrast._do_transform,
                "gamma": contrast.gamma_value if contrast._do_transform else None,
            }
        )
    return draws


@pytest.mark.parametrize("name, probability", [("affine", 0.8), ("noise", 0.5), ("contrast", 0.5)])
def test_each_transform_fires_with_its_probability(paper_draws, name, probability):
    hits = sum(draw[name] for draw in paper_draws)
    assert _binomial_ok(hits, len(paper_draws), probability), (name, hits, len(paper_draws))


def test_rotation_gamma_and_noise_ranges(paper_draws):
    angles = np.degrees([d["angle"] for d in paper_draws if d["affine"]])
    assert np.abs(angles).max() <= 15.0 + 1e-9
    assert np.abs(angles).max() > 14.0 and np.mean(np.abs(angles) > 5.0) > 0.55  # not all tiny
    assert np.mean(angles > 0) == pytest.approx(0.5, abs=0.06)
    gammas = np.array([d["gamma"] for d in paper_draws if d["contrast"]])
    assert gammas.min() >= 0.5 and gammas.max() <= 4.5
    assert (
        gammas.min() < 0.6
        and gammas.max() > 4.4
        and np.mean(gammas) == pytest.approx(2.5, abs=0.15)
    )
    stds = np.array([d["noise_std"] for d in paper_draws if d["noise"]])  # sigma ~ U(0, 0.1)
    assert (
        stds.max() <= 0.1 * 1.4
        and stds.max() > 0.09
        and np.mean(stds) == pytest.approx(0.05, abs=0.01)
    )


def _only(**probabilities) -> AugmentConfig:
    return dataclasses.replace(
        PAPER, name="test", **{f"{k}_prob": v for k, v in probabilities.items()}
    )


def test_rotation_turns_the_image_by_the_drawn_angle():
    """A bar through the centre comes out turned by the angle RandAffine drew (<= 15 degrees)."""
    config = _only(affine=1.0, noise=0.0, contrast=0.0)
    affine = build_transforms(config).transforms[0]
    size = 65
    image = torch.zeros(1, size, size)
    image[0, size // 2 - 1 : size // 2 + 2, 8:-8] = 1.0
    rows, cols = np.mgrid[0:size, 0:size] - size // 2
    turned = []
    for seed in range(40):
        out = augment_image(image, seed, config)[0].numpy()
        weights = out / out.sum()
        cov_rc = (weights * rows * cols).sum()
        var_c, var_r = (weights * cols**2).sum(), (weights * rows**2).sum()
        measured = 0.5 * math.degrees(math.atan2(2 * cov_rc, var_c - var_r))
        drawn = math.degrees(float(affine.rand_affine_grid.rotate_params[0]))
        assert abs(measured) <= 15.5
        assert abs(abs(measured) - abs(drawn)) < 1.0, (measured, drawn)
        turned.append(abs(measured))
    assert max(turned) > 10.0


def test_noise_is_added_with_sigma_up_to_0_1():
    config = _only(affine=0.0, noise=1.0, contrast=0.0)
    noise = build_transforms(config).transforms[0]
    image = torch.full((1, 128, 128), 0.5)
    sigmas = []
    for seed in range(30):
        out = augment_image(image, seed, config)
        np.testing.assert_allclose((out - image).numpy(), noise.noise, atol=1e-6)
        sigmas.append(float((out - image).std()))
        assert abs(float((out - image).mean())) < 0.01
    assert max(sigmas) <= 0.102 and max(sigmas) > 0.08


def test_contrast_is_the_gamma_curve_between_min_and_max():
    config = _only(affine=0.0, noise=0.0, contrast=1.0)
    contrast = build_transforms(config).transforms[0]
    image = torch.linspace(0.1, 1.3, 64 * 64).reshape(1, 64, 64)
    for seed in range(20):
        out = augment_image(image, seed, config)
        gamma = contrast.gamma_value
        assert 0.5 <= gamma <= 4.5
        expected = ((image - 0.1) / 1.2) ** gamma * 1.2 + 0.1
        np.testing.assert_allclose(out.numpy(), expected.numpy(), atol=1e-5)


def test_augmentation_is_a_pure_function_of_the_seed_triple():
    images = torch.rand(6, 1, 24, 24)
    first = augment_radiographs(images, batch_generator(7, 3, 2), PAPER)
    augment_radiographs(
        torch.rand(5, 1, 24, 24), batch_generator(1, 1, 1), PAPER
    )  # other draws between
    again = augment_radiographs(images.clone(), batch_generator(7, 3, 2), "paper")
    assert torch.equal(first, again)
    assert first.shape == images.shape and first.dtype == images.dtype
    for other in ((7, 3, 3), (7, 4, 2), (8, 3, 2)):
        assert not torch.equal(first, augment_radiographs(images, batch_generator(*other), PAPER))
    # per image, not per batch position's neighbours: each image's draw depends on its seed only
    seeds = image_seeds(batch_generator(7, 3, 2), 6)
    for index in (0, 5):
        assert torch.equal(first[index], augment_image(images[index], int(seeds[index]), PAPER))
    # int and tuple seeds are deterministic too
    assert torch.equal(
        augment_radiographs(images, (7, 3, 2)), augment_radiographs(images, (7, 3, 2))
    )
    assert torch.equal(augment_radiographs(images, 11), augment_radiographs(images, 11))


def test_profiles_store_their_augmentation():
    assert PROFILES["paper"].augmentation == "paper"
    for profile in PROFILES.values():
        assert profile.augmentation in AUGMENTATIONS
        stored = profile.to_dict()
        assert stored["augmentation"] == profile.augmentation
        assert TrainProfile.from_dict(stored) == profile
    old = PROFILES["quick"].to_dict()
    del old["augmentation"]  # a checkpoint written before the field existed
    assert TrainProfile.from_dict(old).augmentation == "paper"
    with pytest.raises(ValueError, match="unknown augmentation"):
        augment_radiographs(torch.rand(2, 1, 8, 8), 0, "strong")
