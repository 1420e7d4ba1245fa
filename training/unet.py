"""The direct-synthesis baseline (the paper's U-Net comparison): radiograph ROI -> both maps.

``mris train-unet`` as a library call (``train_unet``). Same data, profile, budget and machinery
as the encoders (``training/run.py``, ``training/trainer.py``):

- input: the encoders' radiograph ROI from the training cache (``training/cache.py``, made by the
  shared ``mris.roi``), ``[N, 1, S, S]`` with S = the profile's ``encoder_px``;
- target: ``[N, 2, S, S]`` (fc, tc) in mm, NaN outside cartilage, at the map grid resized to
  S x S: with ``m`` the finite mask and ``t`` the map with NaN -> 0, the target is
  ``resize(t) / resize(m)`` where ``resize(m) >= 0.5`` and NaN elsewhere (normalised resizing:
  edges do not blend towards 0). Cached as ``unet_targets.npy`` beside the encoder cache arrays;
- loss: masked L1 in mm over cartilage pixels only (``masked_l1``: mask = finite target pixels);
- network: ``ThicknessUNet`` (``training/models.py``), 3 levels of ``width``, 2x, 4x channels
  (default 8-16-32, ``--width``);
- budget: the profile's epochs and batch size, AdamW (lr ``lr_radiograph``, ``weight_decay``),
  grad-norm clip, StepLR(step_size, gamma) per epoch, the same radiograph augmentation;
- validation: MAE in mm over cartilage pixels (per image and region, then averaged) on the
  database subjects held out by ``run.split_validation``; the lowest MAE is kept in ``best.pt``;
  ``last.pt`` is written atomically after every epoch with model, optimiser, scheduler and RNG
  state, so ``--resume`` continues exactly.

Output folder ``out``: ``unet.onnx`` (input ``image`` ``[N, 1, S, S]``, output ``thickness``
``[N, 2, S, S]`` in mm, finite everywhere: the caller masks), ``unet-card.json`` (written last:
profile, preprocessing constants, metrics, parity, sha256 of ``unet.onnx``), ``log.csv``.
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
from mris.training.checkpoint import as_stored, autocast_for, check_resumable, read_checkpoint, restore_rng, rng_state, save_checkpoint
from mris.training.profiles import TrainProfile, get_profile

from mris.constants import PreprocessConfig
from mris.errors import BadParameter, ManifestError
from mris.fsutil import (
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    ensure_empty_output_dir,
    sha256_file,
)

UNET_CHECKPOINT_FORMAT = "mris-unet-checkpoint/1"
UNET_RUN_FORMAT = "mris-unet-run/1"
UNET_CARD_FORMAT = "mris-unet-card/1"
UNET_FILE = "unet.onnx"
UNET_CARD = "unet-card.json"
UNET_WIDTH = 8  # channels 8-16-32 by default (--width 16: 16-32-64, about 0.6x the speed)
TARGETS_FILE = "unet_targets.npy"


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


def build_targets(manifest, rows, config: PreprocessConfig, path: Path,
                  tick: Callable[[int, int], None] | None = None) -> np.ndarray:
    """``[N, 2, S, S]`` targets of ``rows``, cached (atomically) at ``path``; memory-mapped."""
    from mris.thickness import load_thickness_map

    path = Path(path)
    if not path.is_file():
        out = np.zeros((len(rows), 2, config.encoder_px, config.encoder_px), np.float32)
        for p, row in enumerate(rows):
            for c, map_path in enumerate((row.fc_path, row.tc_path)):
                out[p, c] = map_to_target(load_thickness_map(manifest.resolve_path(map_path)), config)
            if tick is not None:
                tick(p + 1, len(rows))
        atomic_save_npy(path, out)
    return np.load(path, mmap_mode="r")


@dataclass
class UnetData:
    radiographs: np.ndarray  # [N, S, S]
    targets: np.ndarray  # [N, 2, S, S] mm, NaN outside cartilage
    train_rows: list[int]
    val_rows: list[int]


@dataclass
class UnetTrainer:
    """Trains the U-Net in ``work_dir`` (``last.pt``, ``best.pt``, ``log.*``)."""

    data: UnetData
    profile: TrainProfile
    work_dir: Path
    device: torch.device
    seed: int
    width: int = UNET_WIDTH
    scale_mm: float = 3.0
    log: Callable[[str], None] = print
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from mris.training.models import ModelConfig, build_model

        self.work_dir = Path(self.work_dir)
        torch.manual_seed(self.seed)
        self.model = build_model(ModelConfig("unet", width=self.width))
        self.model.scale_mm = float(self.scale_mm)  # mm per network unit (the thickness inputs' scale)
        self.model.to(self.device)
        p = self.profile
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=p.lr_radiograph, weight_decay=p.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=p.step_size, gamma=p.gamma)
        self.epoch = 0
        self.saved_epoch = 0  # the epoch last.pt holds (what an interruption keeps)
        self.best_mae = float("inf")
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.train_images = 0

    @property
    def last_path(self) -> Path:
        return self.work_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.work_dir / "best.pt"

    def _config_blob(self) -> dict[str, Any]:
        return {"profile": self.profile.to_dict(), "seed": self.seed, "width": self.width, "scale_mm": self.scale_mm,
                "train_rows": len(self.data.train_rows), "val_rows": len(self.data.val_rows)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": UNET_CHECKPOINT_FORMAT, "config": self._config_blob(), "epoch": self.epoch,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best": {"mae": self.best_mae, "epoch": self.best_epoch, "metrics": self.best_metrics},
            "history": self.history, "timing": {"seconds": self.train_seconds, "images": self.train_images},
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        save_checkpoint(path, state)
        if path == self.last_path:
            self.saved_epoch = state["epoch"]

    def load(self, path: Path) -> None:
        state = read_checkpoint(path, self.device, UNET_CHECKPOINT_FORMAT, self._config_blob(), "MRIS U-Net")
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

    def _autocast(self):
        return autocast_for(self.device)

    def _tensor(self, array: np.ndarray, rows: Sequence[int], channel_axis: bool) -> torch.Tensor:
        order = np.argsort(rows)
        block = np.empty((len(rows),) + array.shape[1:], np.float32)
        block[order] = array[np.asarray(rows)[order]]
        tensor = torch.from_numpy(block)
        return (tensor.unsqueeze(1) if channel_axis else tensor).to(self.device, non_blocking=True)

    def batches(self) -> list[list[int]]:
        """This epoch's batches of training rows: a permutation that is a pure function of
        (seed, epoch); the last partial batch is kept when it holds at least 2 images."""
        order = np.random.default_rng([self.seed, self.epoch, 11]).permutation(len(self.data.train_rows))
        size = self.profile.batch_size
        out = [[self.data.train_rows[i] for i in order[s : s + size]] for s in range(0, len(order), size)]
        return [b for b in out if len(b) >= 2]

    def train_epoch(self) -> float:
        from mris.training.augment import augment_radiographs
        from mris.training.trainer import batch_generator

        self.model.train()
        losses = []
        start = time.perf_counter()
        for index, rows in enumerate(self.batches()):
            x = self._tensor(self.data.radiographs, rows, True)
            y = self._tensor(self.data.targets, rows, False)
            if self.profile.augment:
                x = augment_radiographs(x, batch_generator(self.seed, self.epoch, index), self.profile.augmentation)
            with self._autocast():
                pred = self.model(x)
            loss = masked_l1(pred.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.profile.grad_clip)
            self.optimizer.step()
            losses.append(float(loss.detach()))
            self.train_images += len(rows)
        self.train_seconds += time.perf_counter() - start
        self.scheduler.step()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def predict(self, rows: Sequence[int], batch: int = 64) -> np.ndarray:
        self.model.eval()
        out = []
        for s in range(0, len(rows), batch):
            with self._autocast():
                out.append(self.model(self._tensor(self.data.radiographs, rows[s : s + batch], True)).float().cpu().numpy())
        return np.concatenate(out)

    def validate(self) -> dict[str, float]:
        rows = list(self.data.val_rows)
        return mae_by_region(self.predict(rows), np.asarray(self.data.targets[np.asarray(rows)], np.float32))

    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> None:
        """Train to ``profile.epochs``; ``stop_after_epoch`` (tests) stops early as a Ctrl-C would."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {self.last_path}")
            self.load(self.last_path)
            self.log(f"unet: resumed at epoch {self.epoch} of {self.profile.epochs}")
        else:
            self.save(self.last_path, self.state_dict())
        try:
            while self.epoch < self.profile.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                loss = self.train_epoch()
                metrics = self.validate()
                self.epoch += 1
                record = {"region": "unet", "epoch": self.epoch, "loss_mm": loss, "lr": lr, **metrics,
                          "seconds": round(self.train_seconds, 2)}
                self.history.append(record)
                if metrics["val_mae_mm"] < self.best_mae:
                    self.best_mae, self.best_epoch, self.best_metrics = metrics["val_mae_mm"], self.epoch, metrics
                    self.save(self.best_path, {"format": UNET_CHECKPOINT_FORMAT, "epoch": self.epoch,
                                               "model": self.model.state_dict(), "metrics": metrics})
                self.save(self.last_path, self.state_dict())
                _write_log(self.work_dir, self.history)
                if self.on_epoch is not None:
                    self.on_epoch(record)
        except KeyboardInterrupt:
            self.log(f"unet: interrupted; {self.last_path} holds epoch {self.saved_epoch}: rerun with --resume")
            raise

    def load_best(self) -> None:
        state = torch.load(self.best_path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.model.eval()


def mae_by_region(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Per image and region: mean |error| in mm over the finite target pixels; then the mean
    over images per region (``val_mae_fc_mm``, ``val_mae_tc_mm``) and of both (``val_mae_mm``)."""
    out = {}
    for c, region in enumerate(("fc", "tc")):
        t, p = target[:, c], pred[:, c]
        mask = np.isfinite(t)
        counts = mask.reshape(len(t), -1).sum(axis=1)
        err = np.where(mask, np.abs(p - np.nan_to_num(t)), 0.0).reshape(len(t), -1).sum(axis=1)
        good = counts > 0
        out[f"val_mae_{region}_mm"] = float((err[good] / counts[good]).mean()) if good.any() else float("nan")
    out["val_mae_mm"] = (out["val_mae_fc_mm"] + out["val_mae_tc_mm"]) / 2
    return out


def _write_log(folder: Path, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(folder) / "log.csv", buffer.getvalue())
    atomic_write_json(Path(folder) / "log.json", history)


def check_unet_parity(model: torch.nn.Module, onnx_path: Path, images: np.ndarray,
                      threads: int | None = None) -> float:
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
        raise ExportParityError(f"ONNX export {onnx_path.name} fails parity: max abs diff {diff:.2e} "
                                f"(limit {PARITY_TOLERANCE:.0e})")
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
    width: int = UNET_WIDTH
    work_dir: Path | None = None

    @property
    def train_dir(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".training")


def train_unet(request: UnetRequest, log: Callable[[str], None] = lambda m: None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train, export ``unet.onnx`` with parity, write ``unet-card.json``; returns the metrics."""
    from mris.training.cache import build_cache
    from mris.training.export import export_onnx, library_versions
    from mris.training.run import split_validation
    from mris.training.trainer import pick_device, set_determinism

    from mris.manifest import read_manifest

    started = time.perf_counter()
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
    if profile.encoder_px % 4:
        raise BadParameter(f"the U-Net needs an input side divisible by 4, the profile has {profile.encoder_px}")

    train_dir = request.train_dir
    identity = {"format": UNET_RUN_FORMAT, "manifest_sha256": sha256_file(request.manifest),
                "profile": profile.to_dict(), "seed": request.seed, "width": request.width}
    identity = as_stored(identity)
    run_json = train_dir / "run.json"
    if request.resume:
        check_resumable(run_json, identity, "U-Net run")
        request.out.mkdir(parents=True, exist_ok=True)
    else:
        ensure_empty_output_dir(request.out, request.force)
        if run_json.is_file() and not request.force:
            raise FileExistsError(f"{train_dir} holds a U-Net run: use --resume to continue it or --force to restart")
        for name in ("last.pt", "best.pt"):
            (train_dir / name).unlink(missing_ok=True)
        train_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_json, identity)

    set_determinism(request.seed, request.threads)
    config = PreprocessConfig(encoder_px=profile.encoder_px)
    cache = build_cache(request.manifest, manifest, database, config, train_dir / "cache", ["radiograph"])
    targets = build_targets(manifest, database, config, cache.root / TARGETS_FILE)
    train_pos, val_pos = split_validation(database, profile.val_fraction, request.seed)
    log(f"U-Net: device {device}, profile {profile.name}, {len(train_pos)} training and {len(val_pos)} "
        f"validation pairs (held out by subject)")
    trainer = UnetTrainer(UnetData(cache["radiograph"], targets, train_pos, val_pos), profile, train_dir, device,
                          request.seed, width=request.width, scale_mm=config.thickness_scale_mm, log=log, on_epoch=on_epoch)
    trainer.fit(resume=request.resume and trainer.last_path.is_file())
    trainer.load_best()
    model = trainer.model.float().cpu().eval()
    s = profile.encoder_px
    onnx_path = export_onnx(model, request.out / UNET_FILE, (s, s), ["thickness"])
    val_images = np.asarray(cache["radiograph"][np.sort(val_pos)[:64]], np.float32)[:, None]
    parity = check_unet_parity(model, onnx_path, val_images, request.threads)
    log(f"U-Net: best epoch {trainer.best_epoch}, validation MAE {trainer.best_metrics['val_mae_mm']:.3f} mm, "
        f"ONNX parity max abs diff {parity:.1e}")
    _write_log(request.out, trainer.history)
    (request.out / "log.json").unlink(missing_ok=True)
    metrics = {"best_epoch": trainer.best_epoch, "validation": trainer.best_metrics, "parity_max_abs_diff": parity,
               "train_seconds": round(trainer.train_seconds, 1),
               "images_per_second": round(trainer.train_images / trainer.train_seconds, 1) if trainer.train_seconds else 0.0,
               "seconds": round(time.perf_counter() - started, 1), "device": str(device)}
    card = {
        "format": UNET_CARD_FORMAT, "file": UNET_FILE, "sha256": {UNET_FILE: sha256_file(onnx_path)},
        "input": {"name": "image", "shape": ["N", 1, s, s]},
        "output": {"name": "thickness", "shape": ["N", 2, s, s], "channels": ["fc", "tc"], "units": "mm",
                   "note": "finite everywhere; mask outside cartilage; grid = the thickness map resized to S x S"},
        "preprocess": config.to_dict(), "profile": profile.to_dict(), "seed": request.seed, "width": request.width,
        "manifest_sha256": identity["manifest_sha256"], "database_pairs": len(database),
        "validation_subjects": sorted({database[p].subject_id for p in val_pos}),
        "method": "direct synthesis U-Net (3 levels: width, 2x, 4x channels), masked L1 in mm on cartilage pixels, the encoders' budget",
        "metrics": metrics, "versions": library_versions(),
    }
    atomic_write_json(request.out / UNET_CARD, card)
    return metrics
