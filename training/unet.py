"""The direct-synthesis baselines (the paper's U-Net and pix2pix comparisons): radiograph ROI ->
both maps.

``mris train-unet`` and ``mris train-pix2pix`` as library calls (``train_unet``, with
``UnetRequest.gan``). Same data, split, preprocessing, augmentation, sampler and number of
optimiser steps as the encoders (``training/run.py``, ``training/trainer.py``):

- input: the encoders' radiograph ROI from the training cache (``training/cache.py``, made by the
  shared ``mris.roi``), ``[N, 1, S, S]`` with S = the profile's ``encoder_px``;
- target: ``[N, 2, S, S]`` (fc, tc) in mm, NaN outside cartilage, at the map grid resized to
  S x S: with ``m`` the finite mask and ``t`` the map with NaN -> 0, the target is
  ``resize(t) / resize(m)`` where ``resize(m) >= 0.5`` and NaN elsewhere (normalised resizing:
  edges do not blend towards 0). Cached as ``unet_targets.npy`` beside the encoder cache arrays;
- network: ``ThicknessUNet`` (``training/models.py``): the published U-Net (MONAI ``BasicUNet``,
  4 down-samplings, ``width`` doubling to 16x), width = the profile's ``unet_width`` (64 paper,
  16 quick) unless ``--width``;
- batches: the encoders' ``KneeVisitSampler`` on the same training knees with the same seed: one
  random visit per knee per epoch, so an epoch has exactly the encoders' batches and the run the
  encoders' optimiser steps, ``epochs x len(sampler)`` (one encoder pair's steps: the encoders train
  one pair per region, these networks predict both maps at once);
- U-Net: masked L1 in mm over cartilage pixels only (``masked_l1``: mask = finite target
  pixels); the profile's optimiser: AdamW (lr ``lr_radiograph``, ``weight_decay``), grad-norm clip,
  StepLR(step_size, gamma) per epoch;
- pix2pix (Isola et al. 2017, and its reference code's defaults): the same U-Net as generator
  ``G``, a PatchGAN ``D`` (``PatchDiscriminator``, ``patch_layers(S)`` strided layers: the 70 x 70
  patch at 256 px, 16 x 16 at 64 px; first-level channels = the U-Net's width) conditioned on the
  ROI (input: ROI and both maps, in network units mm / 3). Losses: D, half the sum of the
  real and fake binary cross-entropies (vanilla GAN); G, BCE(D(x, G(x)), real) + ``LAMBDA_L1`` (100)
  x the masked L1 in network units. Both maps given to D are masked with the true cartilage (0
  outside), as the L1 is, so D judges only the cartilage. Adam, lr 2e-4, betas (0.5, 0.999), no
  weight decay, no clip; lr constant for the first half of the epochs, then linearly to 0 (the
  reference's ``linear`` policy); one D step then one G step per batch (G's steps are counted);
- validation: MAE in mm over cartilage pixels (per image and region, then averaged) on the
  database subjects held out by ``run.split_validation``; the lowest MAE is kept in ``best.pt``
  (for pix2pix too: the same selection rule for both baselines);
  ``last.pt`` is written atomically after every epoch with the networks, optimisers, schedulers
  and RNG state, so ``--resume`` continues exactly.

Output folder ``out``: ``unet.onnx`` or ``pix2pix.onnx`` (G only; input ``image`` ``[N, 1, S, S]``,
output ``thickness`` ``[N, 2, S, S]`` in mm, finite everywhere: the caller masks),
``unet-card.json`` / ``pix2pix-card.json`` (written last: profile, architecture, parameters,
optimiser steps, preprocessing constants, metrics, parity, sha256 of the ONNX file), ``log.csv``.
Training state lives in ``<out>.training/`` (``run.json``, ``last.pt``, ``best.pt``, ``cache/``).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mris.constants import CARTILAGES, PreprocessConfig
from mris.errors import BadParameter, ManifestError
from mris.fsutil import (
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    ensure_empty_output_dir,
    sha256_file,
)
from mris.npyio import load_npy
from mris.training.checkpoint import (
    as_stored,
    autocast_for,
    check_resumable,
    read_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from mris.training.profiles import TrainProfile, get_profile

UNET_CHECKPOINT_FORMAT = "mris-unet-checkpoint/2"
UNET_RUN_FORMAT = "mris-unet-run/2"
UNET_CARD_FORMAT = "mris-unet-card/2"
UNET_FILE = "unet.onnx"
UNET_CARD = "unet-card.json"
PIX2PIX_FILE = "pix2pix.onnx"
PIX2PIX_CARD = "pix2pix-card.json"
PAPER_UNET_WIDTH = 64  # Ronneberger et al. 2015
TARGETS_FILE = "unet_targets.npy"
# pix2pix (Isola et al. 2017, section 3.3 and the reference code's defaults)
LAMBDA_L1 = 100.0
GAN_LR = 2e-4
GAN_BETAS = (0.5, 0.999)


def masked_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean |pred - target| over the finite pixels of ``target`` (0 when there are none)."""
    mask = torch.isfinite(target)
    diff = (pred - torch.where(mask, target, torch.zeros_like(target))).abs() * mask
    return diff.sum() / mask.sum().clamp_min(1)


def map_to_target(thickness_mm: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """``(S, S)`` float32 mm, NaN outside cartilage (normalised resize of the map, see above)."""
    from mris.imageops import resize

    thickness = np.asarray(thickness_mm, np.float32)
    mask = np.isfinite(thickness).astype(np.float32)
    shape = (config.encoder_px, config.encoder_px)
    value = resize(np.nan_to_num(thickness, nan=0.0), shape)
    weight = resize(mask, shape)
    out = np.full(shape, np.nan, np.float32)
    keep = weight >= 0.5
    out[keep] = value[keep] / weight[keep]
    return out


def build_targets(
    manifest,
    rows,
    config: PreprocessConfig,
    path: Path,
    tick: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """``[N, 2, S, S]`` targets of ``rows``, cached (atomically) at ``path``; memory-mapped."""
    from mris.thickness import load_thickness_map

    path = Path(path)
    if not path.is_file():
        out = np.zeros((len(rows), 2, config.encoder_px, config.encoder_px), np.float32)
        for p, row in enumerate(rows):
            for c, map_path in enumerate((row.fc_path, row.tc_path)):
                out[p, c] = map_to_target(
                    load_thickness_map(manifest.resolve_path(map_path)), config
                )
            if tick is not None:
                tick(p + 1, len(rows))
        atomic_save_npy(path, out)
    return load_npy(path, mmap_mode="r")


@dataclass
class UnetData:
    radiographs: np.ndarray  # [N, S, S]
    targets: np.ndarray  # [N, 2, S, S] mm, NaN outside cartilage
    train_rows: list[int]
    val_rows: list[int]
    train_knees: list[str]  # knee id per train row (the sampler draws one visit per knee)


@dataclass
class UnetTrainer:
    """Trains the U-Net in ``work_dir`` (``last.pt``, ``best.pt``, ``log.*``)."""

    data: UnetData
    profile: TrainProfile
    work_dir: Path
    device: torch.device
    seed: int
    width: int = PAPER_UNET_WIDTH
    scale_mm: float = 3.0
    log: Callable[[str], None] = print
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    kind = "unet"

    def __post_init__(self) -> None:
        from mris.training.models import ModelConfig, build_model
        from mris.training.sampler import KneeVisitSampler

        self.work_dir = Path(self.work_dir)
        torch.manual_seed(self.seed)
        self.model = build_model(ModelConfig("unet", width=self.width))
        self.model.scale_mm = float(
            self.scale_mm
        )  # mm per network unit (the thickness inputs' scale)
        self.model.to(self.device)
        # the encoders' sampler, seed and knees: the same batches, so the same optimiser steps
        self.sampler = KneeVisitSampler(self.data.train_knees, self.profile.batch_size, self.seed)
        self._make_optimisers()
        self.epoch = 0
        self.saved_epoch = 0  # the epoch last.pt holds (what an interruption keeps)
        self.best_mae = float("inf")
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.train_images = 0
        self.steps = 0  # optimiser steps taken (of the generator, for pix2pix)

    def _make_optimisers(self) -> None:
        p = self.profile
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=p.lr_radiograph, weight_decay=p.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=p.step_size, gamma=p.gamma
        )

    @property
    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    @property
    def last_path(self) -> Path:
        return self.work_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.work_dir / "best.pt"

    def _config_blob(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "profile": self.profile.to_dict(),
            "seed": self.seed,
            "width": self.width,
            "scale_mm": self.scale_mm,
            "train_rows": len(self.data.train_rows),
            "val_rows": len(self.data.val_rows),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": UNET_CHECKPOINT_FORMAT,
            "config": self._config_blob(),
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best": {"mae": self.best_mae, "epoch": self.best_epoch, "metrics": self.best_metrics},
            "history": self.history,
            "timing": {
                "seconds": self.train_seconds,
                "images": self.train_images,
                "steps": self.steps,
            },
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        save_checkpoint(path, state)
        if path == self.last_path:
            self.saved_epoch = state["epoch"]

    def load(self, path: Path) -> dict[str, Any]:
        state = read_checkpoint(
            path, self.device, UNET_CHECKPOINT_FORMAT, self._config_blob(), "MRIS U-Net"
        )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"])
        self.epoch = self.saved_epoch = state["epoch"]
        self.best_mae, self.best_epoch = state["best"]["mae"], state["best"]["epoch"]
        self.best_metrics = state["best"]["metrics"]
        self.history = state["history"]
        self.train_seconds = state["timing"]["seconds"]
        self.train_images = state["timing"]["images"]
        self.steps = state["timing"]["steps"]
        return state

    def _autocast(self):
        return autocast_for(self.device)

    def _tensor(self, array: np.ndarray, rows: Sequence[int], channel_axis: bool) -> torch.Tensor:
        order = np.argsort(rows)
        block = np.empty((len(rows),) + array.shape[1:], np.float32)
        block[order] = array[np.asarray(rows)[order]]
        tensor = torch.from_numpy(block)
        return (tensor.unsqueeze(1) if channel_axis else tensor).to(self.device, non_blocking=True)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of training rows: the encoders' draw (one visit per knee,
        a pure function of (seed, epoch); a last batch of 1 dropped)."""
        self.sampler.set_epoch(self.epoch)
        return [[self.data.train_rows[r] for r in batch] for batch in self.sampler]

    def _inputs(self, index: int, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from mris.training.augment import augment_radiographs
        from mris.training.trainer import batch_generator

        x = self._tensor(self.data.radiographs, rows, True)
        y = self._tensor(self.data.targets, rows, False)
        if self.profile.augment:
            x = augment_radiographs(
                x, batch_generator(self.seed, self.epoch, index), self.profile.augmentation
            )
        return x, y

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        with self._autocast():
            pred = self.model(x)
        loss = masked_l1(pred.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.profile.grad_clip)
        self.optimizer.step()
        return {"loss_mm": float(loss.detach())}

    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        losses: list[dict[str, float]] = []
        start = time.perf_counter()
        for index, rows in enumerate(self.batches()):
            losses.append(self.train_step(*self._inputs(index, rows)))
            self.steps += 1
            self.train_images += len(rows)
        self.train_seconds += time.perf_counter() - start
        self._step_schedulers()
        if not losses:
            return {"loss_mm": float("nan")}
        return {name: float(np.mean([loss[name] for loss in losses])) for name in losses[0]}

    def _step_schedulers(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def predict(self, rows: Sequence[int], batch: int = 64) -> np.ndarray:
        self.model.eval()
        out = []
        for s in range(0, len(rows), batch):
            with self._autocast():
                out.append(
                    self.model(self._tensor(self.data.radiographs, rows[s : s + batch], True))
                    .float()
                    .cpu()
                    .numpy()
                )
        return np.concatenate(out)

    def validate(self) -> dict[str, float]:
        rows = list(self.data.val_rows)
        return mae_by_region(
            self.predict(rows), np.asarray(self.data.targets[np.asarray(rows)], np.float32)
        )

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> None:
        """Train to ``profile.epochs``; ``stop_after_epoch`` (tests) stops early as a Ctrl-C
        would."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {self.last_path}")
            self.load(self.last_path)
            self.log(f"{self.kind}: resumed at epoch {self.epoch} of {self.profile.epochs}")
        else:
            self.save(self.last_path, self.state_dict())
        try:
            while self.epoch < self.profile.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                losses = self.train_epoch()
                metrics = self.validate()
                self.epoch += 1
                record = {
                    "region": self.kind,
                    "epoch": self.epoch,
                    **losses,
                    "lr": lr,
                    **metrics,
                    "seconds": round(self.train_seconds, 2),
                }
                self.history.append(record)
                if metrics["val_mae_mm"] < self.best_mae:
                    self.best_mae, self.best_epoch, self.best_metrics = (
                        metrics["val_mae_mm"],
                        self.epoch,
                        metrics,
                    )
                    self.save(
                        self.best_path,
                        {
                            "format": UNET_CHECKPOINT_FORMAT,
                            "epoch": self.epoch,
                            "model": self.model.state_dict(),
                            "metrics": metrics,
                        },
                    )
                self.save(self.last_path, self.state_dict())
                _write_log(self.work_dir, self.history)
                if self.on_epoch is not None:
                    # the callback also gets the run's length (epoch n/N, ETA); the log does not
                    self.on_epoch({**record, "epochs": self.profile.epochs})
        except KeyboardInterrupt:
            self.log(
                f"{self.kind}: interrupted; {self.last_path} holds epoch {self.saved_epoch}: "
                "rerun with --resume"
            )
            raise

    def load_best(self) -> None:
        state = torch.load(self.best_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.model.eval()

    def architecture(self) -> dict[str, Any]:
        """What the card records about the networks."""
        from mris.training.models import UNET_LEVELS, unet_features

        return {
            "network": "U-Net (Ronneberger et al. 2015), monai.networks.nets.BasicUNet: "
            "two 3x3 conv + batch norm + ReLU per level, 2x2 max pool, 2x2 transposed conv, "
            "skip concatenation",
            "levels": UNET_LEVELS,
            "features": list(unet_features(self.width)),
            "width": self.width,
            "paper_width": PAPER_UNET_WIDTH,
            "parameters": _parameters(self.model),
            "receptive_field_px": 188,
        }


class Pix2PixTrainer(UnetTrainer):
    """pix2pix: the U-Net as generator (``self.model``) and a PatchGAN discriminator (module
    docstring: losses, optimiser, schedule)."""

    kind = "pix2pix"

    def __post_init__(self) -> None:
        from mris.training.models import ModelConfig, build_model, patch_layers

        self.layers = patch_layers(self.profile.encoder_px)
        torch.manual_seed(self.seed + 1)  # D's init: not the generator's stream
        self.discriminator = build_model(
            ModelConfig("patchgan", width=self.width, layers=self.layers)
        ).to(self.device)
        super().__post_init__()

    def _make_optimisers(self) -> None:
        epochs = self.profile.epochs
        constant = (epochs + 1) // 2

        def linear_decay(epoch: int) -> float:  # the reference's "linear" lr policy
            return 1.0 - max(0, epoch + 1 - constant) / float(epochs - constant + 1)

        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=GAN_LR, betas=GAN_BETAS)
        self.optimizer_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=GAN_LR, betas=GAN_BETAS
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, linear_decay)
        self.scheduler_d = torch.optim.lr_scheduler.LambdaLR(self.optimizer_d, linear_decay)

    def _step_schedulers(self) -> None:
        self.scheduler.step()
        self.scheduler_d.step()

    def _config_blob(self) -> dict[str, Any]:
        return {
            **super()._config_blob(),
            "discriminator_layers": self.layers,
            "lambda_l1": LAMBDA_L1,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict(),
            "scheduler_d": self.scheduler_d.state_dict(),
        }

    def load(self, path: Path) -> dict[str, Any]:
        state = super().load(path)
        self.discriminator.load_state_dict(state["discriminator"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.scheduler_d.load_state_dict(state["scheduler_d"])
        return state

    def train_epoch(self) -> dict[str, float]:
        self.discriminator.train()
        return super().train_epoch()

    def _judge(self, x: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            return self.discriminator(torch.cat([x, maps], dim=1)).float()

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        mask = torch.isfinite(y)
        real = (
            torch.where(mask, y, torch.zeros_like(y)) / self.scale_mm
        )  # network units, 0 outside cartilage
        with self._autocast():
            fake_mm = self.model(x).float()
        fake = fake_mm / self.scale_mm * mask
        # D: real pairs -> 1, generated pairs -> 0, the objective halved (pix2pix)
        self.discriminator.requires_grad_(True)
        real_logits, fake_logits = self._judge(x, real), self._judge(x, fake.detach())
        loss_d = 0.5 * (
            bce(real_logits, torch.ones_like(real_logits))
            + bce(fake_logits, torch.zeros_like(fake_logits))
        )
        self.optimizer_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.optimizer_d.step()
        # G: fool D, plus lambda x L1 on cartilage (network units)
        self.discriminator.requires_grad_(False)
        fooled = self._judge(x, fake)
        loss_gan = bce(fooled, torch.ones_like(fooled))
        loss_l1 = masked_l1(fake_mm, y)
        loss_g = loss_gan + LAMBDA_L1 * loss_l1 / self.scale_mm
        self.optimizer.zero_grad(set_to_none=True)
        loss_g.backward()
        self.optimizer.step()
        return {
            "loss_mm": float(loss_l1.detach()),
            "loss_gan": float(loss_gan.detach()),
            "loss_d": float(loss_d.detach()),
        }

    def architecture(self) -> dict[str, Any]:
        from mris.training.models import patch_receptive_px

        return {
            "generator": super().architecture(),
            "discriminator": {
                "network": "PatchGAN (pix2pix NLayerDiscriminator): 4x4 convs, batch norm, "
                "LeakyReLU 0.2; input ROI + fc + tc (mm / 3, 0 outside the true cartilage)",
                "strided_layers": self.layers,
                "patch_px": patch_receptive_px(self.layers),
                "width": self.width,
                "parameters": _parameters(self.discriminator),
            },
            "loss": f"D: (BCE(real) + BCE(fake)) / 2; G: BCE + {LAMBDA_L1:g} x L1 "
            "(mm / 3, cartilage pixels)",
            "optimiser": f"Adam lr {GAN_LR:g}, betas {GAN_BETAS}, constant for "
            f"{(self.profile.epochs + 1) // 2} "
            "epochs then linear to 0; no clip, no weight decay",
        }


def _parameters(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def mae_by_region(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per image and region: mean |error| in mm over the finite target pixels; then the mean
    over images per region (``val_mae_fc_mm``, ``val_mae_tc_mm``) and of both (``val_mae_mm``)."""
    out = {}
    for c, region in enumerate(CARTILAGES):
        t, p = target[:, c], pred[:, c]
        mask = np.isfinite(t)
        counts = mask.reshape(len(t), -1).sum(axis=1)
        err = np.where(mask, np.abs(p - np.nan_to_num(t)), 0.0).reshape(len(t), -1).sum(axis=1)
        good = counts > 0
        out[f"val_mae_{region}_mm"] = (
            float((err[good] / counts[good]).mean()) if good.any() else float("nan")
        )
    out["val_mae_mm"] = (out["val_mae_fc_mm"] + out["val_mae_tc_mm"]) / 2
    return out


def _write_log(folder: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(folder) / "log.csv", buffer.getvalue())
    atomic_write_json(Path(folder) / "log.json", history)


def check_unet_parity(
    model: torch.nn.Module, onnx_path: Path, images: np.ndarray, threads: int | None = None
) -> float:
    """Max |torch - onnxruntime| over ``images`` ``[N, 1, S, S]``; raises ``ExportParityError``
    above ``PARITY_TOLERANCE`` or on a non-finite output."""
    from mris.training.export import PARITY_TOLERANCE, ExportParityError, onnx_session

    session = onnx_session(onnx_path, threads)
    model = model.eval().float().cpu()
    diff = 0.0
    for s in range(0, len(images), 32):
        chunk = np.ascontiguousarray(images[s : s + 32], np.float32)
        ours = session.run(["thickness"], {"image": chunk})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(chunk)).numpy()
        if not np.isfinite(ours).all():
            raise ExportParityError(f"{onnx_path.name} returns non-finite thickness")
        diff = max(diff, float(np.abs(ours - ref).max()))
    if diff > PARITY_TOLERANCE:
        raise ExportParityError(
            f"ONNX export {onnx_path.name} fails parity: max abs diff {diff:.2e} "
            f"(limit {PARITY_TOLERANCE:.0e})"
        )
    return diff


@dataclass
class UnetRequest:
    manifest: Path
    out: Path
    profile: str = "quick"
    epochs: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    resume: bool = False
    force: bool = False
    seed: int = 0
    threads: int | None = None
    width: int | None = None  # None: the profile's unet_width
    work_dir: Path | None = None
    gan: bool = False  # pix2pix: the U-Net as generator with a PatchGAN discriminator

    @property
    def train_dir(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".training")

    @property
    def kind(self) -> str:
        return "pix2pix" if self.gan else "unet"


def train_unet(
    request: UnetRequest,
    log: Callable[[str], None] = lambda m: None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train, export ``unet.onnx`` (``pix2pix.onnx``: the generator) with parity, write
    ``unet-card.json`` (``pix2pix-card.json``); returns the metrics."""
    from mris.manifest import read_manifest
    from mris.training.cache import build_cache
    from mris.training.export import export_onnx, library_versions
    from mris.training.run import split_validation
    from mris.training.trainer import pick_device, set_determinism

    started = time.perf_counter()
    name = "pix2pix" if request.gan else "U-Net"
    onnx_file, card_file = (PIX2PIX_FILE, PIX2PIX_CARD) if request.gan else (UNET_FILE, UNET_CARD)
    manifest = read_manifest(request.manifest)
    database = manifest.select(["database"])
    if not database:
        raise ManifestError(f"manifest {request.manifest} has no 'database' rows to train on")
    try:
        profile = get_profile(request.profile).with_overrides(request.epochs, request.batch_size)
        device = pick_device(request.device)
    except ValueError as exc:
        raise BadParameter(str(exc)) from exc
    if profile.epochs < 1 or profile.batch_size < 2:
        raise BadParameter("--epochs must be >= 1 and --batch-size >= 2")
    if profile.encoder_px % 16:
        raise BadParameter(
            "the U-Net (4 down-samplings) needs an input side divisible by 16, the profile "
            f"has {profile.encoder_px}"
        )
    width = request.width or profile.unet_width

    train_dir = request.train_dir
    identity = {
        "format": UNET_RUN_FORMAT,
        "kind": request.kind,
        "manifest_sha256": sha256_file(request.manifest),
        "profile": profile.to_dict(),
        "seed": request.seed,
        "width": width,
    }
    identity = as_stored(identity)
    run_json = train_dir / "run.json"
    if request.resume:
        check_resumable(run_json, identity, f"{name} run")
        request.out.mkdir(parents=True, exist_ok=True)
    else:
        ensure_empty_output_dir(request.out, request.force)
        if run_json.is_file() and not request.force:
            raise FileExistsError(
                f"{train_dir} holds a {name} run: use --resume to continue it or --force to restart"
            )
        for stale in ("last.pt", "best.pt"):
            (train_dir / stale).unlink(missing_ok=True)
        train_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_json, identity)

    set_determinism(request.seed, request.threads)
    config = PreprocessConfig(encoder_px=profile.encoder_px)
    cache = build_cache(
        request.manifest, manifest, database, config, train_dir / "cache", ["radiograph"]
    )
    targets = build_targets(manifest, database, config, cache.root / TARGETS_FILE)
    train_pos, val_pos = split_validation(database, profile.val_fraction, request.seed)
    train_knees = [database[p].knee_id for p in train_pos]
    trainer_class = Pix2PixTrainer if request.gan else UnetTrainer
    trainer = trainer_class(
        UnetData(cache["radiograph"], targets, train_pos, val_pos, train_knees),
        profile,
        train_dir,
        device,
        request.seed,
        width=width,
        scale_mm=config.thickness_scale_mm,
        log=log,
        on_epoch=on_epoch,
    )
    steps = {
        "per_epoch": trainer.steps_per_epoch,
        "epochs": profile.epochs,
        "total": trainer.steps_per_epoch * profile.epochs,
        "counted_as": "epochs x batches of the encoders' sampler (one visit per training knee, "
        "batch_size, a "
        "last batch of 1 dropped): the optimiser steps of one encoder pair"
        + ("; one discriminator step per generator step" if request.gan else ""),
    }
    log(
        f"{name}: device {device}, profile {profile.name}, width {width}, "
        f"{len(set(train_knees))} training knees "
        f"({len(train_pos)} pairs, one visit per knee per epoch), {len(val_pos)} validation "
        "pairs (held out by "
        f"subject); {steps['total']} optimiser steps ({steps['per_epoch']} per epoch)"
    )
    trainer.fit(resume=request.resume and trainer.last_path.is_file())
    trainer.load_best()
    model = trainer.model.float().cpu().eval()
    s = profile.encoder_px
    onnx_path = export_onnx(model, request.out / onnx_file, (s, s), ["thickness"])
    val_images = np.asarray(cache["radiograph"][np.sort(val_pos)[:64]], np.float32)[:, None]
    parity = check_unet_parity(model, onnx_path, val_images, request.threads)
    log(
        f"{name}: best epoch {trainer.best_epoch}, validation MAE "
        f"{trainer.best_metrics['val_mae_mm']:.3f} mm, "
        f"ONNX parity max abs diff {parity:.1e}"
    )
    _write_log(request.out, trainer.history)
    (request.out / "log.json").unlink(missing_ok=True)
    metrics = {
        "best_epoch": trainer.best_epoch,
        "validation": trainer.best_metrics,
        "parity_max_abs_diff": parity,
        "optimiser_steps": trainer.steps,
        "train_seconds": round(trainer.train_seconds, 1),
        "images_per_second": round(trainer.train_images / trainer.train_seconds, 1)
        if trainer.train_seconds
        else 0.0,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(device),
    }
    architecture = trainer.architecture()
    generator = architecture.get("generator", architecture)
    width_note = (
        f"U-Net width {width} at {s} px ({profile.name} profile, "
        f"{generator['parameters'] / 1e6:.1f} M "
        f"parameters); paper: {PAPER_UNET_WIDTH}"
    )
    card = {
        "format": UNET_CARD_FORMAT,
        "kind": request.kind,
        "file": onnx_file,
        "sha256": {onnx_file: sha256_file(onnx_path)},
        "input": {"name": "image", "shape": ["N", 1, s, s]},
        "output": {
            "name": "thickness",
            "shape": ["N", 2, s, s],
            "channels": list(CARTILAGES),
            "units": "mm",
            "note": "finite everywhere; mask outside cartilage; grid = the thickness map "
            "resized to S x S",
        },
        "preprocess": config.to_dict(),
        "profile": profile.to_dict(),
        "seed": request.seed,
        "width": width,
        "width_note": width_note,
        "architecture": architecture,
        "optimiser_steps": steps,
        "manifest_sha256": identity["manifest_sha256"],
        "database_pairs": len(database),
        "train_knees": len(set(train_knees)),
        "validation_subjects": sorted({database[p].subject_id for p in val_pos}),
        "method": (
            "pix2pix: the U-Net generator with a PatchGAN discriminator conditioned on the "
            "ROI, L1 (x100) on "
            "cartilage pixels + adversarial loss"
            if request.gan
            else "direct synthesis U-Net, masked L1 in mm on cartilage pixels, the encoders' "
            "optimiser"
        )
        + "; the encoders' sampler (one visit per knee per epoch) and number of optimiser steps",
        "metrics": metrics,
        "versions": library_versions(),
    }
    atomic_write_json(request.out / card_file, card)
    return metrics
