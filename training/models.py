"""One factory for every network MRIS trains (timm-style): ``build_model(ModelConfig)``.

Weights come only from an explicit source: ``ModelConfig.init_weights`` names a local file
(a torchvision ResNet-18 ``state_dict``, e.g. ImageNet weights saved with ``torch.save``);
without it the network is randomly initialised and the caller says so loudly. Nothing is ever
downloaded.

Kinds:

- ``encoder``: ResNet-18 (torchvision) with the final fc removed, 512-d output, L2-normalised
  (DESIGN.md, The method). Input ``[N, 1, H, W]``; the single channel is repeated to 3 channels
  inside the model (so ImageNet weights load unchanged and the ONNX input is 1 channel). No
  ImageNet mean/std normalisation, as in the reference code: inputs are the shared
  preprocessing's outputs (radiograph ROI with 99th pct -> 0.99; thickness mm / 3).
- ``localiser_global`` / ``localiser_refine``: the two stages of the knee localiser
  (``mris.localiser`` documents their inputs and outputs).
- ``unet``: the direct-synthesis baseline (``training/unet.py``): radiograph ROI ``[N, 1, S, S]``
  -> thickness ``[N, 2, S, S]`` (fc, tc) in mm; ``width`` is the first level's channels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_DIM = 512


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # encoder | localiser_global | localiser_refine | unet
    init_weights: str | None = None  # local path to a torchvision resnet18 state_dict
    width: int = 16  # localiser channel width

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RetrievalEncoder(nn.Module):
    """f(.) or g(.): ResNet-18 trunk -> 512-d L2-normalised embedding. ``[N,1,H,W] -> [N,512]``."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models import resnet18

        self.backbone = resnet18(weights=None)
        self.backbone.fc = nn.Identity()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.backbone(image.repeat(1, 3, 1, 1))
        # clamp like F.normalize's eps, written out so the exported graph is plain ops
        return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def load_backbone_weights(encoder: RetrievalEncoder, path: str | Path) -> list[str]:
    """Load a torchvision ResNet-18 state_dict (fc.* ignored). Returns the ignored keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-weights {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    ignored = [k for k in state if k.startswith("fc.")]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = encoder.backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a ResNet-18 state_dict: missing {missing[:3]}..., unexpected {unexpected[:3]}..."
        )
    return ignored


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """``[N, K, h, w]`` heatmap logits -> ``[N, K, 2]`` expected (x, y) in [0, 1] (pixel centres)."""
    n, k, h, w = logits.shape
    prob = torch.softmax(logits.reshape(n, k, h * w), dim=-1).reshape(n, k, h, w)
    xs = (torch.arange(w, dtype=logits.dtype, device=logits.device) + 0.5) / w
    ys = (torch.arange(h, dtype=logits.dtype, device=logits.device) + 0.5) / h
    x = (prob.sum(dim=2) * xs).sum(dim=-1)
    y = (prob.sum(dim=3) * ys).sum(dim=-1)
    return torch.stack([x, y], dim=-1)


class GlobalLocaliser(nn.Module):
    """Whole radiograph (low resolution) -> both knee centres and a presence confidence each.

    Input ``image`` ``[N, 1, rows, cols]``. Outputs ``centres`` ``[N, 2, 2]`` (x, y) as fractions
    of the input width/height, knee 0 = image-left (patient RIGHT), knee 1 = image-right (patient
    LEFT); ``confidence`` ``[N, 2]`` in [0, 1].
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(1, width, 2), _block(width, 2 * width, 2), _block(2 * width, 4 * width, 1),
        )
        self.context = nn.Sequential(_block(4 * width, 4 * width, 2), _block(4 * width, 4 * width, 1))
        self.heatmap = nn.Conv2d(8 * width, 2, 1)
        self.presence = nn.Linear(4 * width, 2)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.features(image)  # stride 4
        context = self.context(local)  # stride 8
        up = F.interpolate(context, size=local.shape[-2:], mode="nearest")
        logits = self.heatmap(torch.cat([local, up], dim=1))
        centres = _soft_argmax(logits)
        confidence = torch.sigmoid(self.presence(context.mean(dim=(2, 3))))
        return centres, confidence

    def forward_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        local = self.features(image)
        context = self.context(local)
        up = F.interpolate(context, size=local.shape[-2:], mode="nearest")
        return _soft_argmax(self.heatmap(torch.cat([local, up], dim=1))), self.presence(context.mean(dim=(2, 3)))


class RefineLocaliser(nn.Module):
    """A knee patch (``refine_mm`` square, RIGHT flipped, from ``mris.roi.extract_roi``) -> the
    joint centre's offset from the patch centre and a presence confidence.

    Input ``image`` ``[N, 1, p, p]``. Outputs ``offset`` ``[N, 2]`` (dx, dy) in patch pixels of
    the (flipped) patch, ``confidence`` ``[N]`` in [0, 1].
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        # stride 4 overall: a 64 px patch gives a 16 x 16 heatmap; the soft-argmax is sub-pixel
        self.features = nn.Sequential(
            _block(1, width, 2), _block(width, 2 * width, 2), _block(2 * width, 4 * width, 1),
        )
        self.heatmap = nn.Conv2d(4 * width, 1, 1)
        self.presence = nn.Linear(4 * width, 1)

    def forward_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(image)
        frac = _soft_argmax(self.heatmap(feats))[:, 0, :]
        size = torch.tensor([image.shape[-1], image.shape[-2]], dtype=image.dtype, device=image.device)
        offset = (frac - 0.5) * size
        return offset, self.presence(feats.mean(dim=(2, 3)))[:, 0]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset, logit = self.forward_logits(image)
        return offset, torch.sigmoid(logit)


class ThicknessUNet(nn.Module):
    """Direct synthesis baseline: a 3-level U-Net (``width``, 2x, 4x channels).

    Input ``image`` ``[N, 1, S, S]`` (S divisible by 4), the encoders' radiograph ROI. Output
    ``thickness`` ``[N, 2, S, S]``: channel 0 femoral, channel 1 tibial, in mm (the last conv
    predicts mm / ``scale_mm`` like the encoders' thickness inputs; the forward multiplies by
    ``scale_mm``). Finite everywhere: the caller masks outside cartilage.
    """

    def __init__(self, width: int = 16, scale_mm: float = 3.0) -> None:
        super().__init__()
        self.scale_mm = float(scale_mm)
        self.enc1 = _block(1, width, 1)
        self.enc2 = _block(width, 2 * width, 2)
        self.enc3 = _block(2 * width, 4 * width, 2)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width, 1)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width, 1)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(image)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(torch.cat([self.up2(e3), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1) * self.scale_mm


def build_model(config: ModelConfig) -> nn.Module:
    """Build a network from its config; load ``init_weights`` when given (encoders only)."""
    if config.kind == "encoder":
        model = RetrievalEncoder()
        if config.init_weights:
            load_backbone_weights(model, config.init_weights)
        return model
    if config.kind == "localiser_global":
        return GlobalLocaliser(config.width)
    if config.kind == "localiser_refine":
        return RefineLocaliser(config.width)
    if config.kind == "unet":
        return ThicknessUNet(config.width)
    raise ValueError(f"unknown model kind {config.kind!r}")
