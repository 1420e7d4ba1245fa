"""Table 3's classifier: a ResNet-18 fine-tuned on one method's thickness maps (the paper's
downstream classifier, reference ``downstream_task/model.py`` and ``pred_train.py``).

- input: the fc map above the tc map in one image (the reference's ``read_img2`` concatenates
  them along the rows), NaN -> 0 (its ``replace_nan``), in mm (no normalisation, as there),
  repeated to 3 channels (its ``prepare``) so ImageNet weights fit; ``[N, 2, h, w]`` arrays of
  (fc, tc) come in, already at the classifier's map size (``mris.evaluation.downstream`` resizes
  by cell means), and become ``[N, 3, 2h, w]``;
- network: torchvision ``resnet18(weights=None)``; with ``weights_path`` the state dict there
  (ImageNet, or any ResNet-18 of the same shape; its ``fc.*`` is dropped) is loaded and, as the
  reference does, ``conv1``/``bn1``/``layer1`` stay frozen (only ``layer2``-``layer4`` and the
  head learn). Without weights every layer learns (a frozen random stem would only hurt).
  Nothing is downloaded. The head: ``Linear(512, classes)`` with the reference's Xavier-uniform
  init and zero bias;
- loss: cross-entropy with ``balanced`` class weights (the reference's ``compute_class_weight``).
  The reference applies the cross-entropy to softmax probabilities (a second softmax) scaled by
  100; we apply it to the logits (the same minimum, without the flattened gradient);
- optimiser: AdamW (lr per task, weight decay 0.1 as the reference), StepLR(step_epochs, 0.2)
  per epoch, batch 64, ``epochs`` epochs; the final epoch's model is tested (the reference picks
  the best epoch on a validation fold of its training split; we have no such fold);
- no augmentation (the reference adds CoarseDropout and Jigsaw with imgaug, not a dependency).

``DownstreamSettings`` holds all of it; ``settings_for(task, profile)`` gives the paper's
(DESIGN.md: 30 epochs, lr 1e-5 KLG / 1e-4 progression, decay 0.2 every 10 epochs, the map grid
as is) and the quick one (4 epochs, 24 x 24 maps, a higher lr that a from-scratch network
needs within those epochs).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mris.evaluation.downstream import QUICK_MAP_PX, classifier_setting

TASKS = ("klg", "progression")
FROZEN_WHEN_PRETRAINED = ("conv1", "bn1", "layer1")


@dataclass(frozen=True)
class DownstreamSettings:
    """Everything one classifier run uses. ``map_px``: (rows, cols) of each of the fc and tc
    maps given to the network (None = as they come)."""

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.1
    step_epochs: int = 10
    gamma: float = 0.2
    map_px: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_LR = {"klg": 1e-5, "progression": 1e-4}
QUICK_EPOCHS = 4
QUICK_STEP_EPOCHS = 2
QUICK_LR = 1e-3


def settings_for(
    task: str, profile: str = "paper", epochs: int | None = None
) -> DownstreamSettings:
    """DESIGN.md's setting (``paper``) or the demo's (``quick``, and ``reference`` too:
    ``QUICK_EPOCHS`` epochs, maps of ``QUICK_MAP_PX``, lr ``QUICK_LR``, the decay every
    ``QUICK_STEP_EPOCHS``). ``epochs`` overrides (the decay keeps its share of the epochs)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if classifier_setting(profile) == "paper":
        settings = DownstreamSettings(epochs=30, lr=PAPER_LR[task], step_epochs=10)
    else:
        settings = DownstreamSettings(
            epochs=QUICK_EPOCHS, lr=QUICK_LR, step_epochs=QUICK_STEP_EPOCHS, map_px=QUICK_MAP_PX
        )
    if epochs is not None:
        settings = replace(
            settings,
            epochs=epochs,
            step_epochs=max(1, round(epochs * settings.step_epochs / settings.epochs)),
        )
    return settings


def arrange(maps: np.ndarray) -> torch.Tensor:
    """``[N, 2, h, w]`` (fc, tc; mm, NaN outside cartilage) -> float32 ``[N, 3, 2h, w]``: fc above
    tc, NaN -> 0, repeated to 3 channels."""
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    stacked = np.concatenate([maps[:, 0], maps[:, 1]], axis=1)[:, None]
    return torch.from_numpy(np.ascontiguousarray(stacked)).expand(-1, 3, -1, -1).contiguous()


def build_classifier(classes: int, weights_path: Path | None = None) -> nn.Module:
    """ResNet-18 with a ``classes``-way head; ``weights_path``: a local state dict (nothing is
    fetched), its ``fc.*`` ignored, the stem and ``layer1`` frozen as the reference does."""
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if weights_path is not None:
        state = torch.load(Path(weights_path), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("fc.") for k in missing):
            raise ValueError(
                f"{weights_path} is not a ResNet-18 state dict (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        for name, parameter in model.named_parameters():
            if name.split(".")[0] in FROZEN_WHEN_PRETRAINED:
                parameter.requires_grad = False
    head = nn.Linear(512, classes)
    bound = float(np.sqrt(6.0 / (head.in_features + head.out_features)))
    nn.init.uniform_(head.weight, -bound, bound)
    nn.init.zeros_(head.bias)
    model.fc = head
    return model


def make_optimiser(model: nn.Module, settings: DownstreamSettings):
    """(AdamW over the trainable parameters, StepLR stepped once per epoch)."""
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=settings.lr,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimiser, step_size=settings.step_epochs, gamma=settings.gamma
    )
    return optimiser, scheduler


def balanced_weights(labels: np.ndarray, classes: int) -> torch.Tensor:
    """scikit-learn's ``balanced`` class weights (n / (classes present * count)); 0 for a class
    absent from training."""
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    weights = np.zeros(classes, np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.from_numpy(weights)


def fit_predict(
    train_maps: np.ndarray,
    train_labels: np.ndarray,
    test_maps: np.ndarray,
    classes: int,
    settings: DownstreamSettings,
    seed: int = 0,
    weights_path: Path | None = None,
    device: str = "cpu",
) -> np.ndarray:
    """Train on ``train_maps`` ``[N, 2, h, w]`` / ``train_labels`` (int in [0, classes)) and
    return float64 ``[M, classes]`` softmax probabilities for ``test_maps``. Deterministic for a
    seed on the CPU (initialisation and batch order both come from it)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_classifier(classes, weights_path).to(device)
    optimiser, scheduler = make_optimiser(model, settings)
    labels = torch.as_tensor(np.asarray(train_labels, np.int64))
    criterion = nn.CrossEntropyLoss(weight=balanced_weights(labels.numpy(), classes).to(device))
    inputs = arrange(train_maps)
    for _ in range(settings.epochs):
        model.train()
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, order.numel(), settings.batch_size):
            batch = order[start : start + settings.batch_size]
            if batch.numel() < 2:  # batch norm needs two samples in training mode
                continue
            optimiser.zero_grad(set_to_none=True)
            loss = criterion(model(inputs[batch].to(device)), labels[batch].to(device))
            loss.backward()
            optimiser.step()
        scheduler.step()
    return predict(model, test_maps, settings.batch_size, device)


@torch.no_grad()
def predict(
    model: nn.Module, maps: np.ndarray, batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    model.eval()
    inputs = arrange(maps)
    out = [
        torch.softmax(model(inputs[start : start + batch_size].to(device)), dim=1).cpu()
        for start in range(0, inputs.shape[0], batch_size)
    ]
    return torch.cat(out).double().numpy() if out else np.zeros((0, model.fc.out_features))
