"""Training profiles: every hyper-parameter of a run, named.

- ``paper``: DESIGN.md's exact setting (Chen & Niethammer 2023 and the reference code):
  256 x 256 inputs (combined thickness input 512 x 256), 450 epochs, batch 64, AdamW with lr
  1e-4 (radiograph encoder) / 1e-5 (thickness encoder), weight decay 1e-3, grad-norm clip 1.0,
  StepLR every 150 epochs with gamma 0.2, margin 0.1, the reference's augmentation
  (``augmentation="paper"``: MONAI RandAffine / RandGaussianNoise / RandAdjustContrast).
- ``quick``: the demo / CI setting. Same method and optimiser, smaller inputs and few epochs so that
  the 300-subject demo cohort trains in a few minutes on 2 CPU cores. Its numbers were chosen by
  measurement (docs/TRAINING.md gives the figures): 64 px inputs keep a ResNet-18 step about 16x
  cheaper than at 256 px, and higher learning rates with a short StepLR reach a useful recall within
  the epoch budget. The baselines' U-Net is the published network at width 16 instead of 64
  (16-32-64-128-256 channels, 1.9 M parameters instead of 31.1 M) so that the U-Net and pix2pix
  train together in about 8 minutes on 2 cores. Its augmentation is the paper's too: the ``light``
  set (same transforms, gentler ranges) overfits within the quick budget and retrieves held-out
  knees worse (docs/TRAINING.md, Profiles, gives the measurement).

- ``reference``: the committed reference evaluation's setting (docs/results/): the quick
  method and optimiser at 96 px inputs (1.46 mm per pixel over the 140 mm ROI, against 2.2 at
  64 px) for 30 epochs with the StepLR at 20 on the eval cohort's ~1,000 training knees (960
  optimiser steps, four times the demo's). Sized from the demo's per-step figures for about 90
  minutes on 2 CPU cores with the baselines, the combined encoders and Table 3; the committed
  run took 2 h 11 min, partly on shared cores (docs/results/README.md gives its times).

A profile is a frozen dataclass; ``--epochs`` / ``--batch-size`` override it through
``with_overrides`` and the effective profile is stored in the checkpoint and the model card.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class LocaliserProfile:
    """Knee-localiser training (two stages, KNEEL-like; see ``mris.localiser``).

    - ``global_input_px``: (rows, cols) the whole radiograph is resized to for the global stage.
    - ``refine_mm`` / ``refine_px``: the refinement patch side in mm and in px around each
      global estimate (``refine_mm / refine_px`` mm per px).
    - ``offsets_per_knee`` / ``offset_sigma_mm``: training patches per knee, centred at the true
      centre plus a Gaussian offset (sigma in mm, clipped at 2.5 sigma) that imitates the global
      stage's error.
    - ``max_images``: cap on the training radiographs (the localiser needs few).
    """

    global_input_px: tuple[int, int] = (64, 80)
    refine_mm: float = 64.0
    refine_px: int = 64
    offsets_per_knee: int = 3
    offset_sigma_mm: float = 8.0
    max_images: int = 300
    global_epochs: int = 15
    refine_epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-3
    negatives_fraction: float = 0.15
    confidence_threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainProfile:
    name: str
    encoder_px: int
    epochs: int
    batch_size: int
    lr_radiograph: float = 1e-4
    lr_thickness: float = 1e-5
    weight_decay: float = 1e-3
    grad_clip: float = 1.0
    step_size: int = 150
    gamma: float = 0.2
    margin: float = 0.1
    val_fraction: float = 0.15  # of the database subjects, held out for per-epoch recall
    augment: bool = True
    unet_width: int = 64  # the baselines' U-Net (and PatchGAN) first-level channels; 64 published
    augmentation: str = "paper"  # a name in training.augment.AUGMENTATIONS
    localiser: LocaliserProfile = field(default_factory=LocaliserProfile)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_overrides(
        self, epochs: int | None = None, batch_size: int | None = None
    ) -> TrainProfile:
        changes: dict[str, Any] = {}
        if epochs is not None:
            changes["epochs"] = epochs
        if batch_size is not None:
            changes["batch_size"] = batch_size
        return replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainProfile:
        data = dict(data)
        # Profiles stored before ``augmentation`` existed (those runs used a hand-rolled set
        # that is gone) load with the default.
        data.setdefault("augmentation", cls.augmentation)
        loc = dict(data.pop("localiser", {}))
        if "global_input_px" in loc:
            loc["global_input_px"] = tuple(loc["global_input_px"])
        return cls(localiser=LocaliserProfile(**loc), **data)


PROFILES: dict[str, TrainProfile] = {
    "paper": TrainProfile(name="paper", encoder_px=256, epochs=450, batch_size=64),
    "quick": TrainProfile(
        name="quick",
        encoder_px=64,
        epochs=35,
        batch_size=32,
        lr_radiograph=1e-3,
        lr_thickness=1e-3,
        step_size=25,
        gamma=0.2,
        unet_width=16,
        augmentation="paper",
    ),
}
# The quick method at the reference evaluation's size (docstring above).
PROFILES["reference"] = replace(
    PROFILES["quick"], name="reference", encoder_px=96, epochs=30, step_size=20
)


def get_profile(name: str) -> TrainProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}") from None
