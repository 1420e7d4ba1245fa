"""Training of the two-stage knee localiser (runtime and stage definitions: ``mris.localiser``).

Data: radiographs of the training subjects (capped at ``max_images``) with both true joint
centres in the manifest (the synthetic cohort's, or the importer's keypoints). Every input goes
through the runtime's own functions (``global_input``, ``refine_patch`` = the shared ROI code),
so training sees exactly what serving computes. Cached once as ``.npy`` (keyed like the encoder
cache).

- Global stage: whole image at ``global_input_px``; loss = L1 of the centre in global-input
  pixels (for knees that are present) + binary cross-entropy of the presence confidence.
- Refinement: per knee, ``offsets_per_knee`` patches cut around the true centre moved by a
  Gaussian offset (``offset_sigma_mm``, clipped at 2.5 sigma) — the global stage's error; loss
  = L1 of the offset in patch pixels + BCE of the presence.
- Negatives (``negatives_fraction`` of the set, presence 0): uniform noise, blurred noise,
  constant, linear ramps, and (global stage) a real radiograph with one knee's half blanked,
  which teaches "this knee is missing".
- Intensity augmentation only (``mris.training.augment``'s ``localiser`` set: MONAI's
  RandGaussianNoise, sigma up to 0.02, and RandAdjustContrast, gamma 0.8-1.25, always on):
  geometric changes would move the targets.

AdamW, cosine learning rate, batch 32; a couple of minutes on 2 CPU cores for the demo cohort.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mris.fsutil import atomic_save_npy
from mris.localiser import (
    GLOBAL_ORDER,
    REFINE_FILE,
    LocaliserConfig,
    global_input,
    refine_patch,
    scale_intensity,
    source_to_global,
    source_to_offset,
)
from mris.manifest import Manifest, ManifestRow
from mris.training.augment import AUGMENTATIONS, augment_radiographs
from mris.training.models import ModelConfig, build_model
from mris.training.profiles import LocaliserProfile
from mris.training.trainer import batch_generator

INTENSITY_ONLY = AUGMENTATIONS["localiser"]
CACHE_FORMAT = "mris-localiser-cache/1"


def localiser_config(profile: LocaliserProfile) -> LocaliserConfig:
    return LocaliserConfig(
        global_input_px=tuple(profile.global_input_px),
        refine_mm=profile.refine_mm,
        refine_px=profile.refine_px,
        confidence_threshold=profile.confidence_threshold,
    )


def images_with_both_knees(
    rows: Sequence[ManifestRow],
) -> dict[str, dict[str, tuple[float, float]]]:
    """radiograph path -> side -> true (col, row), for radiographs with both knees' keypoints."""
    images: dict[str, dict[str, tuple[float, float]]] = {}
    for row in rows:
        if row.keypoint_x is not None and row.keypoint_y is not None:
            images.setdefault(row.radiograph_path, {})[row.side] = (row.keypoint_x, row.keypoint_y)
    return {path: knees for path, knees in images.items() if set(knees) == set(GLOBAL_ORDER)}


def _negative_image(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    kind = int(rng.integers(4))
    if kind == 0:
        image = rng.random(shape)
    elif kind == 1:
        image = gaussian_filter(rng.random(shape), sigma=float(rng.uniform(0.5, 4.0)))
    elif kind == 2:
        image = np.full(shape, float(rng.random())) + 1e-3 * rng.standard_normal(shape)
    else:
        yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
        image = rng.normal() * xx + rng.normal() * yy + 0.05 * rng.random(shape)
    return scale_intensity(image.astype(np.float32))


@dataclass
class LocaliserData:
    global_images: np.ndarray  # [M, rows, cols]
    global_targets: np.ndarray  # [M, 2, 2] global-input px (x, y), GLOBAL_ORDER
    global_present: np.ndarray  # [M, 2]
    patches: np.ndarray  # [P, p, p]
    offsets: np.ndarray  # [P, 2] patch px
    patch_present: np.ndarray  # [P]


def build_localiser_data(
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    profile: LocaliserProfile,
    cache_dir: Path,
    seed: int,
    tick: Callable[[int, int], None] | None = None,
) -> LocaliserData:
    from mris.dicom import read_radiograph

    config = localiser_config(profile)
    images = images_with_both_knees(rows)
    paths = sorted(images)
    rng = np.random.default_rng([seed, 17])
    if len(paths) > profile.max_images:
        paths = sorted(rng.choice(paths, profile.max_images, replace=False).tolist())
    if len(paths) < 2:
        raise ValueError(
            "the knee localiser needs radiographs with both knees' keypoints in the manifest"
        )
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    digest.update(
        repr((profile.to_dict(), seed, paths, [sorted(images[p].items()) for p in paths])).encode()
    )
    digest.update(str(manifest.root).encode())
    root = Path(cache_dir) / f"localiser-{digest.hexdigest()[:20]}"
    names = (
        "global_images",
        "global_targets",
        "global_present",
        "patches",
        "offsets",
        "patch_present",
    )
    if all((root / f"{n}.npy").is_file() for n in names):
        return LocaliserData(*(np.load(root / f"{n}.npy") for n in names))

    gi, gt, gp, pa, of, pp = [], [], [], [], [], []
    rows_px, cols_px = config.global_input_px
    for done, path in enumerate(paths, start=1):
        radiograph = read_radiograph(manifest.resolve_path(path))
        shape = radiograph.pixels.shape
        gi.append(global_input(radiograph.pixels, config))
        gt.append(
            [
                [u * cols_px, v * rows_px]
                for u, v in (source_to_global(images[path][s], shape) for s in GLOBAL_ORDER)
            ]
        )
        gp.append([1.0, 1.0])
        for side in GLOBAL_ORDER:
            true_xy = images[path][side]
            for _ in range(profile.offsets_per_knee):
                shift_mm = np.clip(
                    rng.normal(0, profile.offset_sigma_mm, 2),
                    -2.5 * profile.offset_sigma_mm,
                    2.5 * profile.offset_sigma_mm,
                )
                centre = (
                    float(
                        np.clip(true_xy[0] + shift_mm[0] / radiograph.spacing_mm, 0, shape[1] - 1)
                    ),
                    float(
                        np.clip(true_xy[1] + shift_mm[1] / radiograph.spacing_mm, 0, shape[0] - 1)
                    ),
                )
                pa.append(refine_patch(radiograph, side, centre, config))
                of.append(source_to_offset(centre, true_xy, side, radiograph.spacing_mm, config))
                pp.append(1.0)
        if tick is not None:
            tick(done, len(paths))
    n_neg = max(2, int(round(profile.negatives_fraction * len(gi))))
    for i in range(n_neg):
        if i % 3 == 2:  # a real radiograph with one knee's half blanked
            source = gi[int(rng.integers(len(paths)))].copy()
            knee = int(rng.integers(2))
            half = slice(0, cols_px // 2) if knee == 0 else slice(cols_px // 2, cols_px)
            source[:, half] = _negative_image(rng, (rows_px, cols_px))[:, half] * float(
                rng.uniform(0, 1)
            )
            present = [1.0, 1.0]
            present[knee] = 0.0
            target = gt[int(rng.integers(len(paths)))]
            gi.append(scale_intensity(source))
            gt.append(target)
            gp.append(present)
        else:
            gi.append(_negative_image(rng, (rows_px, cols_px)))
            gt.append([[0.0, 0.0], [0.0, 0.0]])
            gp.append([0.0, 0.0])
    for _ in range(max(2, int(round(profile.negatives_fraction * len(pa))))):
        pa.append(_negative_image(rng, (config.refine_px, config.refine_px)))
        of.append((0.0, 0.0))
        pp.append(0.0)
    data = LocaliserData(
        np.stack(gi).astype(np.float32),
        np.asarray(gt, np.float32),
        np.asarray(gp, np.float32),
        np.stack(pa).astype(np.float32),
        np.asarray(of, np.float32),
        np.asarray(pp, np.float32),
    )
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        atomic_save_npy(root / f"{name}.npy", getattr(data, name))
    return data


def _fit(
    model: torch.nn.Module,
    images: np.ndarray,
    targets: np.ndarray,
    present: np.ndarray,
    epochs: int,
    profile: LocaliserProfile,
    seed: int,
    device: torch.device,
    stage: int,
    on_epoch: Callable[[int, int, float], None] | None,
) -> list[float]:
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=profile.lr, weight_decay=1e-4)
    steps = epochs * ((len(images) + profile.batch_size - 1) // profile.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=profile.lr, total_steps=max(1, steps), pct_start=0.15
    )
    losses = []
    for epoch in range(epochs):
        order = np.random.default_rng([seed, stage, epoch]).permutation(len(images))
        total = 0.0
        for index, start in enumerate(range(0, len(order), profile.batch_size)):
            rows = np.sort(order[start : start + profile.batch_size])
            x = torch.from_numpy(images[rows]).unsqueeze(1).to(device)
            x = augment_radiographs(
                x, batch_generator(seed, 1000 * stage + epoch, index), INTENSITY_ONLY
            )
            y = torch.from_numpy(targets[rows]).to(device)
            p = torch.from_numpy(present[rows]).to(device)
            centres, logits = model.forward_logits(x)
            if stage == 1:  # centres are fractions; compare in global-input pixels
                size = torch.tensor([x.shape[-1], x.shape[-2]], dtype=x.dtype, device=device)
                err = (centres * size - y).abs().sum(-1)
            else:
                err = (centres - y).abs().sum(-1)
            coord = (err * p).sum() / p.sum().clamp_min(1.0)
            loss = coord + F.binary_cross_entropy_with_logits(logits, p)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / len(images))
        if on_epoch is not None:
            on_epoch(stage, epoch + 1, losses[-1])
    return losses


@dataclass
class LocaliserResult:
    config: LocaliserConfig
    seconds: float
    global_loss: list[float]
    refine_loss: list[float]
    images: int
    patches: int


def train_localiser(
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    profile: LocaliserProfile,
    out_dir: Path,
    cache_dir: Path,
    device: torch.device,
    seed: int,
    tick: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> LocaliserResult:
    """Train both stages and export ``localiser.onnx`` and ``localiser-refine.onnx`` into
    ``out_dir``."""
    from mris.training.export import export_onnx

    start = time.perf_counter()
    data = build_localiser_data(manifest, rows, profile, cache_dir, seed, tick)
    torch.manual_seed(seed + 101)
    global_net = build_model(ModelConfig("localiser_global"))
    refine_net = build_model(ModelConfig("localiser_refine"))
    g_loss = _fit(
        global_net,
        data.global_images,
        data.global_targets,
        data.global_present,
        profile.global_epochs,
        profile,
        seed,
        device,
        1,
        on_epoch,
    )
    r_loss = _fit(
        refine_net,
        data.patches,
        data.offsets,
        data.patch_present,
        profile.refine_epochs,
        profile,
        seed,
        device,
        2,
        on_epoch,
    )
    config = localiser_config(profile)
    export_onnx(
        global_net,
        Path(out_dir) / "localiser.onnx",
        config.global_input_px,
        ["centres", "confidence"],
    )
    export_onnx(
        refine_net,
        Path(out_dir) / REFINE_FILE,
        (config.refine_px, config.refine_px),
        ["offset", "confidence"],
    )
    return LocaliserResult(
        config,
        time.perf_counter() - start,
        g_loss,
        r_loss,
        int((data.global_present.sum(1) > 0).sum()),
        len(data.patches),
    )
