"""Training-only augmentation of radiograph ROIs (never at validation, index building or serving).

The reference's ``preprocess.data_augmentation``, with MONAI's own transforms, applied per image
(MONAI array transforms take one channel-first image, ``[1, S, S]``) after the shared
preprocessing, in this order::

    Compose([RandAffine(prob=0.8, rotate_range=(pi/12, pi/12), padding_mode="border"),
             RandGaussianNoise(prob=0.5, mean=0.0, std=0.1),
             RandAdjustContrast(prob=0.5, gamma=(0.5, 4.5))])

- RandAffine: rotation uniform in +-15 degrees (2D uses the first of the two ranges), bilinear,
  border padding, no translation, scale or shear (MONAI's defaults, as in the reference).
- RandGaussianNoise: MONAI's default ``sample_std=True``, so each noisy image's sigma is drawn
  uniformly in [0, 0.1] (the reference's MONAI did the same), on ROIs whose 99th percentile is
  0.99.
- RandAdjustContrast: ``((x - min) / range) ** gamma * range + min``, gamma uniform in
  [0.5, 4.5].

``AUGMENTATIONS`` names the sets a profile may choose (``TrainProfile.augmentation``): ``paper``
is exactly the above; ``light`` is the same three transforms with gentler ranges (docs/TRAINING.md
gives the measurement behind the ``quick`` profile's choice); ``localiser`` is intensity only
(geometric changes would move the localiser's targets).

Determinism: ``augment_radiographs`` takes the batch's ``torch.Generator`` (seeded from
(run seed, epoch, batch) by ``training.trainer.batch_generator``), an int seed or a sequence of
ints, derives one seed per image from it, and sets the transforms' random state from that seed
(``Compose.set_random_state``) before each image. The output is therefore a pure function of
(images, seed triple, config): a resumed run augments exactly as the uninterrupted one, and the
draws do not depend on the device.

Thickness maps are not augmented: they live in a fixed atlas space (as in the reference code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class AugmentConfig:
    """One named augmentation set, as parameters of the three MONAI transforms.

    - ``affine_prob`` / ``rotation_deg``: RandAffine's probability and its rotation range
      (+- degrees; 0 leaves RandAffine out).
    - ``noise_prob`` / ``noise_std``: RandGaussianNoise's probability and ``std`` (mean 0; sigma
      drawn uniformly in [0, std]); probability 0 leaves it out.
    - ``contrast_prob`` / ``gamma``: RandAdjustContrast's probability and gamma range.
    """

    name: str = "paper"
    affine_prob: float = 0.8
    rotation_deg: float = 15.0
    noise_prob: float = 0.5
    noise_std: float = 0.1
    contrast_prob: float = 0.5
    gamma: tuple[float, float] = (0.5, 4.5)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AUGMENTATIONS: dict[str, AugmentConfig] = {
    # The paper / reference: preprocess.data_augmentation.
    "paper": AugmentConfig(),
    # Same transforms and probabilities, gentler ranges: +-5 degrees, sigma up to 0.03, gamma
    # 0.75-1.33 (the hand-rolled set before issue 13 used about these).
    "light": AugmentConfig(name="light", rotation_deg=5.0, noise_std=0.03, gamma=(0.75, 1.33)),
    # The knee localiser's: intensity only, always on, mild.
    "localiser": AugmentConfig(
        name="localiser",
        affine_prob=0.0,
        rotation_deg=0.0,
        noise_prob=1.0,
        noise_std=0.02,
        contrast_prob=1.0,
        gamma=(0.8, 1.25),
    ),
}


def get_augmentation(name: str) -> AugmentConfig:
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}"
        ) from None


@cache
def build_transforms(config: AugmentConfig):
    """The MONAI ``Compose`` of ``config`` (cached per config; its random state is reset per
    image by ``augment_image``, so sharing it is safe within one thread)."""
    from monai.transforms import Compose, RandAdjustContrast, RandAffine, RandGaussianNoise

    transforms = []
    if config.affine_prob > 0 and config.rotation_deg > 0:
        radians = config.rotation_deg * math.pi / 180
        transforms.append(
            RandAffine(
                prob=config.affine_prob, rotate_range=(radians, radians), padding_mode="border"
            )
        )
    if config.noise_prob > 0:
        transforms.append(RandGaussianNoise(prob=config.noise_prob, mean=0.0, std=config.noise_std))
    if config.contrast_prob > 0:
        transforms.append(RandAdjustContrast(prob=config.contrast_prob, gamma=tuple(config.gamma)))
    return Compose(transforms)


def augment_image(image: torch.Tensor, seed: int, config: AugmentConfig) -> torch.Tensor:
    """One channel-first image ``[C, S, S]`` through ``config``'s transforms with their random
    state set from ``seed`` (a plain tensor of the same shape, dtype and device)."""
    transforms = build_transforms(config)
    transforms.set_random_state(seed=int(seed))
    out = transforms(image)
    out = out.as_tensor() if hasattr(out, "as_tensor") else torch.as_tensor(out)
    return out.to(image.device, image.dtype)


def image_seeds(generator_or_seed: torch.Generator | int | Sequence[int], n: int) -> np.ndarray:
    """``n`` per-image seeds (< 2**31) from a torch generator, an int or a sequence of ints."""
    if isinstance(generator_or_seed, torch.Generator):
        return torch.randint(0, 2**31 - 1, (n,), generator=generator_or_seed).numpy()
    entropy = (
        [int(generator_or_seed)]
        if isinstance(generator_or_seed, (int, np.integer))
        else [int(v) for v in generator_or_seed]
    )
    return (np.random.SeedSequence(entropy).generate_state(n, np.uint32) >> 1).astype(np.int64)


def augment_radiographs(
    images: torch.Tensor,
    generator_or_seed: torch.Generator | int | Sequence[int],
    config: AugmentConfig | str = AUGMENTATIONS["paper"],
) -> torch.Tensor:
    """A batch ``[N, 1, S, S]`` augmented image by image (``config``: an ``AugmentConfig`` or the
    name of one in ``AUGMENTATIONS``); the seeds come from ``generator_or_seed`` (module
    docstring)."""
    if isinstance(config, str):
        config = get_augmentation(config)
    from monai.data import get_track_meta, set_track_meta

    seeds = image_seeds(generator_or_seed, images.shape[0])
    tracking = get_track_meta()
    set_track_meta(False)  # plain tensors: MetaTensor bookkeeping costs ~20 % here, unused
    try:
        with torch.no_grad():
            return torch.stack(
                [augment_image(image, seed, config) for image, seed in zip(images, seeds)]
            )
    finally:
        set_track_meta(tracking)
