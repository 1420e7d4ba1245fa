"""The encoder trainer: one encoder pair (f for radiographs, g for thickness maps) per region.

Exactly DESIGN.md's method: ResNet-18 pair, triplet loss with margin 0.1 (``losses``), one visit
per knee per epoch (``sampler``), AdamW with lr 1e-4 (f) / 1e-5 (g) and weight decay 1e-3 (one
optimiser, two parameter groups: per-parameter AdamW updates make this identical to the
reference code's two optimisers), gradient-norm clip 1.0 applied to each encoder separately (as
the reference code does), StepLR(step, gamma) stepped once per epoch.

Per epoch: mean training loss (the batch sum of eq. 3, averaged over batches) and recall@1/5/10/20
on the validation part of ``database`` (subjects held out by ``val_fraction``; one query per
knee, its first visit; a query counts as found at k when fewer than k validation maps score
strictly higher than its own map). The best epoch by the sum of the four recalls is kept in
``best.pt``. ``last.pt`` is written atomically after every epoch (and once before the first),
with model, optimiser, scheduler, sampler and RNG state, so ``--resume`` continues exactly and a
Ctrl-C loses at most the epoch in progress (a SIGTERM too: ``mris.cli.main`` turns it into the same
``KeyboardInterrupt``; the message names the epoch ``last.pt`` really holds, ``saved_epoch``, even
when the interruption lands while a checkpoint is being written).

``RegionTrainer.loss_fn`` is the loss the steps minimise, ``(f embeddings [N, 512], g embeddings
[N, 512], margin) -> scalar``; it defaults to ``losses.triplet_loss`` (eq. 3) and exists so that
``tests/test_training_learns.py`` can prove a sign error in the loss is caught. Runs never
change it.

Determinism: seeds for python/numpy/torch, ``torch.use_deterministic_algorithms`` (warn only),
cuDNN benchmark off; the sampler's and the augmentation's random draws are pure functions of
(seed, epoch, batch). On CUDA, forward passes run under bf16 autocast (no loss scaling needed);
on the CPU everything is float32.
"""

from __future__ import annotations

import csv
import io
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mris.evaluation.metrics import RECALL_AT, recall_at_k
from mris.fsutil import atomic_write, atomic_write_json, atomic_write_text
from mris.training.augment import augment_radiographs
from mris.training.checkpoint import (
    autocast_for,
    read_checkpoint,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from mris.training.losses import similarity_matrix, triplet_loss
from mris.training.models import ModelConfig, build_model
from mris.training.profiles import TrainProfile
from mris.training.sampler import KneeVisitSampler

CHECKPOINT_FORMAT = "mris-train-checkpoint/1"


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def set_determinism(seed: int, threads: int | None = None) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(
        int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint64)[0] >> 1)
    )
    return generator


@dataclass
class RegionData:
    """Cached inputs of one region: radiograph ROIs and thickness inputs, train and validation."""

    radiographs: np.ndarray  # [N, S, S] memory-mapped, all database rows
    thickness: np.ndarray  # [N, S, S] or [N, 2S, S]
    train_rows: list[int]  # positions into the arrays
    train_knees: list[str]  # knee id per train row
    val_rows: list[int]  # first visit of each validation knee


@dataclass
class TrainResult:
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float
    images_per_second: float
    init: str


@dataclass
class RegionTrainer:
    """Trains one region's encoder pair in ``work_dir``."""

    name: str  # e.g. "separate-fc"
    data: RegionData
    profile: TrainProfile
    work_dir: Path
    device: torch.device
    seed: int
    init_weights: str | None = None
    log: Callable[[str], None] = print
    on_batch: Callable[[int, int], None] | None = None  # (batch done, batches per epoch)
    on_epoch: Callable[[dict[str, Any]], None] | None = None
    # (f embeddings [N, 512], g embeddings [N, 512], margin) -> scalar; eq. 3 unless a test swaps it
    loss_fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = triplet_loss
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        torch.manual_seed(self.seed)
        self.f = build_model(ModelConfig("encoder", init_weights=self.init_weights)).to(self.device)
        # the thickness encoder gets the same (ImageNet) initialisation when given, as in the paper
        self.g = build_model(ModelConfig("encoder", init_weights=self.init_weights)).to(self.device)
        p = self.profile
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.f.parameters(), "lr": p.lr_radiograph},
                {"params": self.g.parameters(), "lr": p.lr_thickness},
            ],
            weight_decay=p.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=p.step_size, gamma=p.gamma
        )
        self.sampler = KneeVisitSampler(self.data.train_knees, p.batch_size, self.seed)
        self.epoch = 0
        self.saved_epoch = 0  # the epoch last.pt holds (what an interruption keeps)
        self.best_score = -1.0
        self.best_epoch = -1
        self.best_metrics: dict[str, float] = {}
        self.train_seconds = 0.0
        self.train_images = 0

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.work_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.work_dir / "best.pt"

    def _config_blob(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_dict(),
            "seed": self.seed,
            "name": self.name,
            "train_rows": len(self.data.train_rows),
            "val_rows": len(self.data.val_rows),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self._config_blob(),
            "epoch": self.epoch,
            "f": self.f.state_dict(),
            "g": self.g.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "best": {
                "score": self.best_score,
                "epoch": self.best_epoch,
                "metrics": self.best_metrics,
            },
            "history": self.history,
            "timing": {"seconds": self.train_seconds, "images": self.train_images},
        }

    def save(self, path: Path, state: dict[str, Any]) -> None:
        save_checkpoint(path, state)
        if path == self.last_path:
            self.saved_epoch = state["epoch"]

    def load(self, path: Path) -> None:
        state = read_checkpoint(
            path, self.device, CHECKPOINT_FORMAT, self._config_blob(), "MRIS training"
        )
        self.f.load_state_dict(state["f"])
        self.g.load_state_dict(state["g"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        self.epoch = self.saved_epoch = state["epoch"]
        self.best_score, self.best_epoch = state["best"]["score"], state["best"]["epoch"]
        self.best_metrics = state["best"]["metrics"]
        self.history = state["history"]
        self.train_seconds = state["timing"]["seconds"]
        self.train_images = state["timing"]["images"]

    # -- steps -----------------------------------------------------------------------------
    def _autocast(self):
        return autocast_for(self.device)

    def _tensor(self, array: np.ndarray, rows: Sequence[int]) -> torch.Tensor:
        # sorted gather from the memory map, then back to the batch order
        order = np.argsort(rows)
        sorted_rows = np.asarray(rows)[order]
        block = np.empty((len(rows),) + array.shape[1:], np.float32)
        block[order] = array[sorted_rows]
        return torch.from_numpy(block).unsqueeze(1).to(self.device, non_blocking=True)

    def train_epoch(self) -> float:
        self.f.train()
        self.g.train()
        self.sampler.set_epoch(self.epoch)
        losses = []
        batches = len(self.sampler)
        start = time.perf_counter()
        for index, rows in enumerate(self.sampler):
            rows = [self.data.train_rows[r] for r in rows]
            x = self._tensor(self.data.radiographs, rows)
            y = self._tensor(self.data.thickness, rows)
            if self.profile.augment:
                x = augment_radiographs(
                    x, batch_generator(self.seed, self.epoch, index), self.profile.augmentation
                )
            with self._autocast():
                fx, gy = self.f(x), self.g(y)
            loss = self.loss_fn(fx.float(), gy.float(), self.profile.margin)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.f.parameters(), self.profile.grad_clip)
            torch.nn.utils.clip_grad_norm_(self.g.parameters(), self.profile.grad_clip)
            self.optimizer.step()
            losses.append(float(loss.detach()))
            self.train_images += len(rows)
            if self.on_batch is not None:
                self.on_batch(index + 1, batches)
        self.train_seconds += time.perf_counter() - start
        self.scheduler.step()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def embed(
        self, model: torch.nn.Module, array: np.ndarray, rows: Sequence[int], batch: int = 128
    ) -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, len(rows), batch):
            with self._autocast():
                out.append(
                    model(self._tensor(array, rows[start : start + batch])).float().cpu().numpy()
                )
        return np.concatenate(out) if out else np.zeros((0, 512), np.float32)

    def validate(self) -> dict[str, float]:
        rows = self.data.val_rows
        queries = self.embed(self.f, self.data.radiographs, rows)
        keys = self.embed(self.g, self.data.thickness, rows)
        similarity = similarity_matrix(torch.from_numpy(queries), torch.from_numpy(keys))
        return recall_at_k(similarity.numpy())

    # -- the loop --------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after_epoch: int | None = None) -> TrainResult:
        """Train to ``profile.epochs``; ``stop_after_epoch`` (tests) returns early after that
        many epochs in total, leaving ``last.pt`` as a Ctrl-C would."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # Imported now, not at the first epoch's plot: a Ctrl-C/SIGTERM landing inside an
        # extension module's import comes out as ImportError, not KeyboardInterrupt, and would
        # skip the checkpoint message below.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401

        if resume:
            if not self.last_path.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {self.last_path}")
            self.load(self.last_path)
            self.log(f"{self.name}: resumed at epoch {self.epoch} of {self.profile.epochs}")
        else:
            self.save(self.last_path, self.state_dict())
        try:
            while self.epoch < self.profile.epochs:
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    break
                lrs = [group["lr"] for group in self.optimizer.param_groups]
                loss = self.train_epoch()
                metrics = self.validate()
                score = sum(metrics.values())
                record = {
                    "region": self.name,
                    "epoch": self.epoch + 1,
                    "loss": loss,
                    "lr_radiograph": lrs[0],
                    "lr_thickness": lrs[1],
                    **metrics,
                    "seconds": round(self.train_seconds, 2),
                }
                self.history.append(record)
                self.epoch += 1
                if score > self.best_score:
                    self.best_score, self.best_epoch, self.best_metrics = score, self.epoch, metrics
                    self.save(
                        self.best_path,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "epoch": self.epoch,
                            "f": self.f.state_dict(),
                            "g": self.g.state_dict(),
                            "metrics": metrics,
                        },
                    )
                self.save(self.last_path, self.state_dict())
                write_logs(self.work_dir, self.history, len(self.data.val_rows))
                if self.on_epoch is not None:
                    # the callback also gets the run's length (epoch n/N, ETA); the log does not
                    self.on_epoch({**record, "epochs": self.profile.epochs})
        except KeyboardInterrupt:
            self.log(
                f"{self.name}: interrupted; {self.last_path} holds epoch {self.saved_epoch}: "
                "rerun with --resume"
            )
            raise
        return TrainResult(
            best_epoch=self.best_epoch,
            best_metrics=self.best_metrics,
            history=self.history,
            seconds=self.train_seconds,
            images_per_second=self.train_images / self.train_seconds if self.train_seconds else 0.0,
            init="weights " + str(self.init_weights) if self.init_weights else "random",
        )

    def load_best(self) -> None:
        state = torch.load(self.best_path, map_location=self.device, weights_only=False)
        self.f.load_state_dict(state["f"])
        self.g.load_state_dict(state["g"])
        self.f.eval()
        self.g.eval()


def write_logs(folder: Path, history: list[dict[str, Any]], gallery: int | None = None) -> None:
    """``log.csv``, ``log.json`` and ``curves.png`` (loss and recall@k per epoch) in ``folder``;
    ``gallery``: the validation gallery's size, for the chance lines (recall@k of a random
    ranking is k / gallery)."""
    if not history:
        return
    columns = list(history[0])
    buffer = io.StringIO()
    # extrasaction="ignore": a run resumed from an older version's history keeps its columns
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(folder / "log.csv", buffer.getvalue())
    atomic_write_json(folder / "log.json", history)
    plot_curves(folder / "curves.png", history, gallery)


def plot_curves(path: Path, history: list[dict[str, Any]], gallery: int | None = None) -> None:
    """Per region: the training loss, and the validation recall@k with the epoch kept (the best
    sum of recalls, as ``RegionTrainer`` keeps it) marked and, with ``gallery``, each k's chance
    level dashed. Legends sit beside the axes, never on the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions = list(dict.fromkeys(record["region"] for record in history))
    fig, axes = plt.subplots(
        len(regions), 2, figsize=(11, 3.2 * len(regions)), squeeze=False, layout="constrained"
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, region in enumerate(regions):
        records = [r for r in history if r["region"] == region]
        epochs = [r["epoch"] for r in records]
        best = max(records, key=lambda r: sum(r[f"R@{k}"] for k in RECALL_AT))
        loss_ax, recall_ax = axes[row]
        loss_ax.plot(epochs, [r["loss"] for r in records], marker=".")
        loss_ax.set_title(f"{region}: training loss")
        loss_ax.set_xlabel("epoch")
        loss_ax.set_ylabel("triplet loss (eq. 3, batch sum)")
        for colour, k in zip(colours, RECALL_AT):
            recall_ax.plot(
                epochs,
                [100 * r[f"R@{k}"] for r in records],
                marker=".",
                color=colour,
                label=f"R@{k}",
            )
            if gallery:
                recall_ax.axhline(
                    100 * min(1.0, k / gallery), color=colour, ls="--", lw=0.8, alpha=0.7
                )
        recall_ax.axvline(best["epoch"], color="grey", ls=":", lw=1.2)
        late = best["epoch"] > (epochs[0] + epochs[-1]) / 2  # label on the side with room
        recall_ax.annotate(
            f"kept: epoch {best['epoch']}",
            (best["epoch"], 100),
            xytext=(-3 if late else 3, -12),
            textcoords="offset points",
            ha="right" if late else "left",
            fontsize=8,
            color="grey",
        )
        chance = f", chance dashed (gallery {gallery})" if gallery else ""
        recall_ax.set_title(f"{region}: validation recall{chance}", fontsize=10)
        recall_ax.set_xlabel("epoch")
        recall_ax.set_ylabel("recall (%)")
        recall_ax.set_ylim(0, 100)
        recall_ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
