"""Training-only augmentation of radiograph ROIs (never at validation, index building or serving).

Applied batch-wise on tensors ``[N, 1, S, S]`` after the shared preprocessing, with a
``torch.Generator`` seeded from (run seed, epoch, batch) so a resumed run augments exactly as the
uninterrupted one. Per image, independently:

- rotation uniform in +-``rotation_deg`` (5 deg: the joint line tilts a few degrees between
  positionings), translation uniform in +-``translation_frac`` of the side (4 %, about 6 mm of a
  140 mm ROI: the keypoint's error), isotropic scale uniform in [1 - s, 1 + s] (s = 5 %:
  magnification and spacing differences); bilinear resampling, zero outside (as the ROI's own
  border padding);
- contrast: multiply by uniform [0.9, 1.1]; gamma: x ** uniform[0.8, 1.25] on x >= 0 (scanner
  and exposure differences);
- additive Gaussian noise with sigma uniform in [0, ``noise_sigma``] (0.02 of the 0.99 target).

Thickness maps are not augmented: they live in a fixed atlas space (as in the reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    rotation_deg: float = 5.0
    translation_frac: float = 0.04
    scale: float = 0.05
    contrast: float = 0.1
    gamma: float = 0.25  # log-uniform gamma in [1/(1+g), 1+g]
    noise_sigma: float = 0.02


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_radiographs(images: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()) -> torch.Tensor:
    """Random geometric and intensity changes; random numbers drawn on the CPU generator so
    the draw does not depend on the device."""
    n = images.shape[0]
    angle = _uniform(n, -config.rotation_deg, config.rotation_deg, generator) * math.pi / 180
    scale = _uniform(n, 1 - config.scale, 1 + config.scale, generator)
    shift = _uniform(2 * n, -2 * config.translation_frac, 2 * config.translation_frac, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], dim=1), torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1
    ).to(images.device, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    contrast = _uniform(n, 1 - config.contrast, 1 + config.contrast, generator)
    log_gamma = _uniform(n, -math.log1p(config.gamma), math.log1p(config.gamma), generator)
    sigma = _uniform(n, 0.0, config.noise_sigma, generator)
    noise = torch.randn(images.shape, generator=generator)
    contrast, gamma, sigma = (t.to(images.device, images.dtype).view(n, 1, 1, 1) for t in (contrast, log_gamma.exp(), sigma))
    out = out.clamp_min(0) ** gamma * contrast
    return out + sigma * noise.to(images.device, images.dtype)
