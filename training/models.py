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
- ``unet``: the direct-synthesis baseline (``training/unet.py``), the published U-Net from MONAI:
  radiograph ROI ``[N, 1, S, S]`` -> thickness ``[N, 2, S, S]`` (fc, tc) in mm; ``width`` is the
  first level's channels (64 in the paper). Also pix2pix's generator.
- ``patchgan``: pix2pix's discriminator (``training/unet.py``, ``--gan``): ROI and maps
  ``[N, 3, S, S]`` -> a real/fake logit per patch; ``layers`` strided convs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

EMBEDDING_DIM = 512


@dataclass(frozen=True)
class ModelConfig:
    kind: str  # encoder | localiser_global | localiser_refine | unet | patchgan
    init_weights: str | None = None  # local path to a torchvision resnet18 state_dict
    width: int = 16  # localiser channel width; U-Net / PatchGAN first-level channels
    layers: int = 3  # PatchGAN strided layers

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
            f"{path} is not a ResNet-18 state_dict: missing {missing[:3]}..., unexpected "
            f"{unexpected[:3]}..."
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
    """``[N, K, h, w]`` heatmap logits -> ``[N, K, 2]`` expected (x, y) in [0, 1] (pixel
    centres)."""
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
            _block(1, width, 2),
            _block(width, 2 * width, 2),
            _block(2 * width, 4 * width, 1),
        )
        self.context = nn.Sequential(
            _block(4 * width, 4 * width, 2), _block(4 * width, 4 * width, 1)
        )
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
        return _soft_argmax(self.heatmap(torch.cat([local, up], dim=1))), self.presence(
            context.mean(dim=(2, 3))
        )


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
            _block(1, width, 2),
            _block(width, 2 * width, 2),
            _block(2 * width, 4 * width, 1),
        )
        self.heatmap = nn.Conv2d(4 * width, 1, 1)
        self.presence = nn.Linear(4 * width, 1)

    def forward_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(image)
        frac = _soft_argmax(self.heatmap(feats))[:, 0, :]
        size = torch.tensor(
            [image.shape[-1], image.shape[-2]], dtype=image.dtype, device=image.device
        )
        offset = (frac - 0.5) * size
        return offset, self.presence(feats.mean(dim=(2, 3)))[:, 0]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        offset, logit = self.forward_logits(image)
        return offset, torch.sigmoid(logit)


UNET_LEVELS = 4  # down-sampling steps of the published U-Net (Ronneberger et al. 2015)


def unet_features(width: int) -> tuple[int, ...]:
    """MONAI ``BasicUNet`` channels: ``width`` doubling over 4 down-samplings (64 -> 1024 at the
    bottom for the published network), then ``width`` at the last up-sampling."""
    return tuple(width * 2**level for level in range(UNET_LEVELS + 1)) + (width,)


class ThicknessUNet(nn.Module):
    """Direct synthesis baseline: the published U-Net (Ronneberger et al. 2015) from MONAI.

    ``monai.networks.nets.BasicUNet``: per level two 3 x 3 conv + batch norm + ReLU, 2 x 2 max
    pooling down, 2 x 2 transposed conv up with skip concatenation, 4 down-samplings, channels
    ``width`` doubling to ``16 * width`` at the bottom (``width`` 64: 64 ... 1024, 31.1 M
    parameters), a 1 x 1 head. Padded convolutions, so the output has the input's size (the
    paper's valid convolutions shrink it); batch norm, which the 2015 paper predates.
    Receptive field 188 px whatever the input size (measured by gradient,
    ``tests/test_training_unet.py``): the whole input at 64 px; at 256 px an output pixel sees
    +-94 px (51 mm of the 140 mm ROI) around itself, so only output pixels within 94 px of the
    ROI centre (each axis) see the joint centre, as with the published network.

    Input ``image`` ``[N, 1, S, S]`` (S divisible by 16), the encoders' radiograph ROI. Output
    ``thickness`` ``[N, 2, S, S]``: channel 0 femoral, channel 1 tibial, in mm (the last conv
    predicts mm / ``scale_mm`` like the encoders' thickness inputs; the forward multiplies by
    ``scale_mm``). Finite everywhere: the caller masks outside cartilage.
    """

    def __init__(self, width: int = 64, scale_mm: float = 3.0) -> None:
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.scale_mm = float(scale_mm)
        self.net = BasicUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            features=unet_features(width),
            act="relu",
            norm="batch",
            dropout=0.0,
            upsample="deconv",
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image) * self.scale_mm


def patch_layers(input_px: int) -> int:
    """PatchGAN depth for an input side: 3 strided layers (the 70 x 70 patch) at 256 px, the
    patch kept at about a quarter of the side elsewhere (64 px: 1 layer, a 16 x 16 patch)."""
    return max(1, round(math.log2(input_px / 32)))


def patch_receptive_px(layers: int) -> int:
    """Receptive field of ``PatchDiscriminator(layers)``: 4 x 4 convs, ``layers`` with stride 2
    then two with stride 1 (3 layers: 70 px)."""
    size = 1
    for stride in reversed([2] * layers + [1, 1]):
        size = size * stride + (4 - stride)
    return size


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017; ``NLayerDiscriminator`` of the reference code):
    4 x 4 convs, ``layers`` with stride 2 (the first without norm), then one with stride 1,
    batch norm, LeakyReLU 0.2, channels ``width`` doubling up to 8x, a 1-channel stride-1 conv
    giving one real/fake logit per patch. Input: the ROI and the two maps, ``[N, 3, S, S]``
    (conditioned on the ROI, as pix2pix conditions on the input image)."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        parts: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        channels = width
        for n in range(1, layers + 1):
            out = width * min(2**n, 8)
            parts += [
                nn.Conv2d(channels, out, 4, stride=2 if n < layers else 1, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out
        parts.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*parts)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.net(pair)


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
    if config.kind == "patchgan":
        return PatchDiscriminator(3, config.width, config.layers)
    raise ValueError(f"unknown model kind {config.kind!r}")
