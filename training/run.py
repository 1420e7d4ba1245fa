"""``mris train`` as a library call: cache -> localiser -> encoders per region -> export with
parity -> test recall -> model bundle. ``commands.py`` only translates the CLI to ``TrainRequest``.

Folders: ``out`` is the model bundle (ONNX files, ``card.json``, ``log.csv``, ``curves.png``;
the card is written last, so a bundle without it is incomplete). Training state lives beside it
in ``<out>.training/`` (``run.json``, one folder per region with ``last.pt`` / ``best.pt`` /
``log.*``, the localiser's ONNX before it is copied, and ``cache/``) so the bundle stays small and
its sha256 listing excludes checkpoints. ``--resume`` reads ``run.json`` and refuses a different
manifest, profile, variant or seed.

The localiser trains inside ``mris train`` (before the encoders; ``--no-localiser`` skips it),
so one command yields one complete bundle with one card; ``mris evaluate-localiser`` re-measures
a bundle's localiser on any split.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mris.constants import PreprocessConfig
from mris.errors import BadParameter, ManifestError
from mris.fsutil import atomic_write_json, ensure_empty_output_dir, sha256_file
from mris.manifest import ManifestRow, read_manifest
from mris.model_bundle import VARIANT_REGIONS
from mris.training.profiles import TrainProfile, get_profile

VARIANT_CHOICES = ("separate", "combined", "both")
RUN_FORMAT = "mris-train-run/1"


@dataclass
class TrainRequest:
    manifest: Path
    out: Path
    variant: str = "separate"
    profile: str = "quick"
    epochs: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    init_weights: Path | None = None
    resume: bool = False
    force: bool = False
    seed: int = 0
    threads: int | None = None
    localiser: bool = True
    work_dir: Path | None = None

    @property
    def variants(self) -> list[str]:
        if self.variant not in VARIANT_CHOICES:
            raise BadParameter(f"--variant must be one of {', '.join(VARIANT_CHOICES)}, got {self.variant!r}")
        return ["separate", "combined"] if self.variant == "both" else [self.variant]

    @property
    def train_dir(self) -> Path:
        return self.work_dir or self.out.with_name(self.out.name + ".training")


@dataclass
class Reporter:
    """Hooks the CLI fills with rich progress bars; the defaults stay silent."""

    log: Callable[[str], None] = lambda message: None
    stage: Callable[[str, int], Any] = lambda description, total: None  # returns a task handle
    advance: Callable[[Any, int], None] = lambda task, completed: None
    epoch: Callable[[dict[str, Any]], None] = lambda record: None


def split_validation(rows: list[ManifestRow], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of training and validation rows of ``database``, held out by subject."""
    subjects = sorted({row.subject_id for row in rows})
    if len(subjects) < 2:
        raise ManifestError("the database split needs at least 2 subjects (training and validation)")
    order = np.random.default_rng([seed, 5]).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, math.ceil(fraction * len(subjects))))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [i for i, row in enumerate(rows) if row.subject_id not in val_subjects]
    val = [i for i, row in enumerate(rows) if row.subject_id in val_subjects]
    return train, val


def region_array(region: str) -> str:
    return region  # cache array names equal region names: fc, tc, combined


def _run_identity(request: TrainRequest, profile: TrainProfile) -> dict[str, Any]:
    return {"format": RUN_FORMAT, "manifest_sha256": sha256_file(request.manifest), "profile": profile.to_dict(),
            "variants": request.variants, "seed": request.seed, "localiser": request.localiser,
            "init_weights": str(request.init_weights) if request.init_weights else None}


def train(request: TrainRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the whole training; returns the summary (also stored in the card's metrics)."""
    import torch

    from mris.training.checkpoint import as_stored, check_resumable

    from mris.localiser import KneeLocaliser, evaluate_localiser
    from mris.training.cache import build_cache
    from mris.training.export import check_encoder_parity, export_onnx, write_bundle_card
    from mris.training.localiser import train_localiser
    from mris.training.sampler import first_visits
    from mris.training.trainer import RegionData, RegionTrainer, pick_device, set_determinism, write_logs

    rep = reporter or Reporter()
    started = time.perf_counter()
    manifest = read_manifest(request.manifest)
    database = manifest.select(["database"])
    if not database:
        raise ManifestError(f"manifest {request.manifest} has no 'database' rows to train on")
    try:
        profile = get_profile(request.profile).with_overrides(request.epochs, request.batch_size)
    except ValueError as exc:
        raise BadParameter(str(exc)) from exc
    if profile.epochs < 1 or profile.batch_size < 2:
        raise BadParameter("--epochs must be >= 1 and --batch-size >= 2")
    if request.init_weights is not None and not Path(request.init_weights).is_file():
        raise BadParameter(f"--init-weights {request.init_weights} does not exist")
    try:
        device = pick_device(request.device)
    except ValueError as exc:
        raise BadParameter(str(exc)) from exc

    # folders and the run identity (what --resume must match)
    train_dir = request.train_dir
    identity = as_stored(_run_identity(request, profile))
    run_json = train_dir / "run.json"
    if request.resume:
        check_resumable(run_json, identity, "training run")
        request.out.mkdir(parents=True, exist_ok=True)
    else:
        ensure_empty_output_dir(request.out, request.force)
        if train_dir.exists():
            if not request.force and run_json.is_file():
                raise FileExistsError(f"{train_dir} holds a training run: use --resume to continue it or --force to restart")
            for child in ("separate-fc", "separate-tc", "combined-combined", "localiser"):
                shutil.rmtree(train_dir / child, ignore_errors=True)
        train_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_json, identity)

    set_determinism(request.seed, request.threads)
    config = PreprocessConfig(encoder_px=profile.encoder_px)
    init = f"weights from {request.init_weights}" if request.init_weights else "RANDOM initialisation (no --init-weights given; the paper starts from ImageNet)"
    rep.log(f"device {device}, {torch.get_num_threads()} threads, profile {profile.name}, encoders: {init}")

    train_pos, val_pos = split_validation(database, profile.val_fraction, request.seed)
    regions = [(variant, region) for variant in request.variants for region in VARIANT_REGIONS[variant]]
    needed = ["radiograph"] + sorted({region_array(region) for _, region in regions})
    cache_dir = train_dir / "cache"

    def cache_tick_factory():
        tasks: dict[str, Any] = {}

        def tick(name: str, done: int, total: int) -> None:
            if name not in tasks:
                tasks[name] = rep.stage(f"cache {name}", total)
            rep.advance(tasks[name], done)

        return tick

    cache = build_cache(request.manifest, manifest, database, config, cache_dir, needed, tick=cache_tick_factory())
    knee_ids = [row.knee_id for row in database]
    months = [row.visit_month for row in database]
    val_first = [val_pos[i] for i in first_visits([knee_ids[p] for p in val_pos], [months[p] for p in val_pos])]
    if len(val_first) < 2:
        raise ManifestError("the validation subjects hold fewer than 2 knees; add database subjects")
    rep.log(f"database: {len(database)} pairs, {len({knee_ids[p] for p in train_pos})} training knees, "
            f"{len(val_first)} validation knees (held out by subject)")

    summary: dict[str, Any] = {"regions": {}, "device": str(device), "init": init}
    card_variants: dict[str, Any] = {}
    bundle_files: list[tuple[Path, str]] = []

    # -- localiser -------------------------------------------------------------------------
    localiser_card = None
    if request.localiser:
        loc_dir = train_dir / "localiser"
        done_file = loc_dir / "done.json"
        if not done_file.is_file():
            loc_dir.mkdir(parents=True, exist_ok=True)
            task = {}

            def loc_tick(done: int, total: int) -> None:
                if "t" not in task:
                    task["t"] = rep.stage("localiser data", total)
                rep.advance(task["t"], done)

            result = train_localiser(manifest, [database[p] for p in train_pos], profile.localiser, loc_dir,
                                     cache_dir, device, request.seed, tick=loc_tick,
                                     on_epoch=lambda stage, epoch, loss: rep.log(
                                         f"localiser {'global' if stage == 1 else 'refine'} epoch {epoch}: loss {loss:.3f}"))
            atomic_write_json(done_file, {"config": result.config.to_dict(), "seconds": round(result.seconds, 1),
                                          "images": result.images, "patches": result.patches,
                                          "final_loss": [result.global_loss[-1], result.refine_loss[-1]]})
        loc_info = json.loads(done_file.read_text())
        from mris.localiser import REFINE_FILE, LocaliserConfig

        loc_config = LocaliserConfig.from_dict(loc_info["config"])
        localiser = KneeLocaliser(loc_dir / "localiser.onnx", loc_dir / REFINE_FILE, loc_config, request.threads)
        eval_split = "test" if manifest.select(["test"]) else "database"
        loc_metrics = evaluate_localiser(localiser, manifest, eval_split)
        rep.log(f"localiser on {eval_split}: median {loc_metrics['median_error_mm']:.2f} mm, "
                f"95th pct {loc_metrics['p95_error_mm']:.2f} mm, max {loc_metrics['max_error_mm']:.2f} mm, "
                f"both knees found on {100 * loc_metrics['all_knees_found_fraction']:.1f} % of {loc_metrics['images']} images")
        summary["localiser"] = {**loc_metrics, "train_seconds": loc_info["seconds"]}
        for name in ("localiser.onnx", REFINE_FILE):
            bundle_files.append((loc_dir / name, name))
        localiser_card = {"file": "localiser.onnx", "input_px": list(loc_config.global_input_px),
                          "details": {"refine_file": REFINE_FILE, "config": loc_config.to_dict(),
                                      "outputs": {"localiser.onnx": ["centres [N,2,2] fractions (x,y), knee 0 = patient RIGHT",
                                                                     "confidence [N,2]"],
                                                  REFINE_FILE: ["offset [N,2] patch px", "confidence [N]"]},
                                      "metrics": summary["localiser"]}}

    # -- encoders per region ---------------------------------------------------------------
    history: list[dict[str, Any]] = []
    test_rows = manifest.select(["test"])
    test_cache = None
    if test_rows:
        test_cache = build_cache(request.manifest, manifest, test_rows, config, cache_dir, needed, tick=cache_tick_factory())
    for variant, region in regions:
        name = f"{variant}-{region}"
        thickness = cache[region_array(region)]
        data = RegionData(radiographs=cache["radiograph"], thickness=thickness, train_rows=train_pos,
                          train_knees=[knee_ids[p] for p in train_pos], val_rows=val_first)
        region_dir = train_dir / name
        resume_region = request.resume and (region_dir / "last.pt").is_file()
        bar = {"task": None}

        def on_batch(done: int, total: int, bar=bar, name=name) -> None:
            if bar["task"] is None:
                bar["task"] = rep.stage(f"{name} epoch", total)
            rep.advance(bar["task"], done)
            if done == total:
                bar["task"] = None

        trainer = RegionTrainer(name=name, data=data, profile=profile, work_dir=region_dir, device=device,
                                seed=request.seed, init_weights=str(request.init_weights) if request.init_weights else None,
                                log=rep.log, on_batch=on_batch, on_epoch=rep.epoch)
        result = trainer.fit(resume=resume_region)
        history.extend(result.history)
        trainer.load_best()
        f_cpu, g_cpu = trainer.f.float().cpu().eval(), trainer.g.float().cpu().eval()
        s = profile.encoder_px
        thickness_px = (2 * s, s) if region == "combined" else (s, s)
        stem = variant if region == "combined" else name  # file names as mris.model_bundle lays out
        names = {"radiograph": f"{stem}-radiograph.onnx", "thickness": f"{stem}-thickness.onnx"}
        export_dir = region_dir / "export"
        export_onnx(f_cpu, export_dir / names["radiograph"], (s, s), ["embedding"])
        export_onnx(g_cpu, export_dir / names["thickness"], thickness_px, ["embedding"])
        val_x = np.asarray(cache["radiograph"][np.sort(val_first)], np.float32)[:, None]
        val_y = np.asarray(thickness[np.sort(val_first)], np.float32)[:, None]
        parity = check_encoder_parity(f_cpu, g_cpu, export_dir / names["radiograph"], export_dir / names["thickness"],
                                      val_x, val_y, threads=request.threads)
        rep.log(f"{name}: ONNX parity max abs diff {max(parity.max_abs_diff_radiograph, parity.max_abs_diff_thickness):.1e}, "
                f"top-20 order identical on {parity.val_queries - parity.top20_order_mismatches}/{parity.val_queries} validation queries")
        val_subjects = [database[p].subject_id for p in np.sort(val_first)]
        region_summary: dict[str, Any] = {
            "best_epoch": result.best_epoch, "validation": result.best_metrics,
            "validation_first_visit": onnx_recall(export_dir / names["radiograph"], export_dir / names["thickness"],
                                                  val_x, val_y, val_subjects, request.threads, request.seed),
            "parity": parity.to_dict(),
            "train_seconds": round(result.seconds, 1), "images_per_second": round(result.images_per_second, 1),
        }
        held_out = region_summary["validation_first_visit"]
        rep.log(f"{name}: validation recall (held-out subjects' first visits, gallery {held_out['gallery']}): "
                + ", ".join(f"{k} {100 * r:.1f} % ({held_out['ratio_to_chance'][k]:.1f}x chance)"
                            for k, r in held_out["recall"].items()))
        if test_cache is not None:
            region_summary["test"] = test_recall(export_dir / names["radiograph"], export_dir / names["thickness"],
                                                 test_cache, region_array(region), request.threads, request.seed)
            t = region_summary["test"]["first_visit"]
            rep.log(f"{name}: test recall (first visits, gallery {t['gallery']}): "
                    + ", ".join(f"{k} {100 * v:.1f} %" for k, v in t["recall"].items())
                    + f"; chance R@20 {100 * t['chance']['R@20']:.1f} % ({t['ratio_to_chance']['R@20']:.1f}x)")
        summary["regions"][name] = region_summary
        card_variants.setdefault(variant, {"regions": {}})["regions"][region] = {
            "radiograph": names["radiograph"], "thickness": names["thickness"],
            "radiograph_input_px": [s, s], "thickness_input_px": list(thickness_px), "embedding_dim": 512,
        }
        for modality in ("radiograph", "thickness"):
            bundle_files.append((export_dir / names[modality], names[modality]))

    # -- the bundle ------------------------------------------------------------------------
    for source, name in bundle_files:
        shutil.copyfile(source, request.out / name)
    if history:
        write_logs(request.out, history)
        (request.out / "log.json").unlink(missing_ok=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    training_info = {
        "profile": profile.to_dict(), "variants": request.variants, "seed": request.seed, "device": str(device),
        "threads": torch.get_num_threads(), "init": init, "manifest_sha256": identity["manifest_sha256"],
        "database_pairs": len(database), "train_knees": len({knee_ids[p] for p in train_pos}),
        "validation_knees": len(val_first), "validation_subjects": sorted({database[p].subject_id for p in val_pos}),
        "method": "MRIS (Chen & Niethammer 2023): ResNet-18 pair, triplet loss m=0.1 one direction, one visit per knee per epoch, AdamW",
    }
    write_bundle_card(request.out, {"preprocess": config.to_dict(), "variants": card_variants,
                                    "localiser": localiser_card, "training": training_info, "metrics": summary})
    return summary


RECALL_RESAMPLES = 1000


def recall_vs_chance(queries: np.ndarray, keys: np.ndarray, subjects: list[str], seed: int) -> dict[str, Any]:
    """Recall@1/5/10/20 of queries [Q, D] against their own keys [Q, D] (the gallery = all keys):
    recall, chance (k / gallery), the ratio to chance and 95 % intervals from resampling subjects
    (``mris.evaluation.tables.retrieval_row``, the evaluation's Table 1 row, without its curve)."""
    from mris.evaluation.tables import retrieval_row

    row = retrieval_row(queries, keys, subjects, RECALL_RESAMPLES, seed)
    row.pop("curve")
    return row


def onnx_embed(radiograph_onnx: Path, thickness_onnx: Path, radiographs: np.ndarray, thickness: np.ndarray,
               threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of [N, 1, S, S] radiograph and thickness inputs by the exported ONNX encoders
    (the serving path)."""
    from mris.encoders import OnnxEncoder

    f = OnnxEncoder(radiograph_onnx, device="cpu", intra_op_threads=threads, batch_size=64)
    g = OnnxEncoder(thickness_onnx, device="cpu", intra_op_threads=threads, batch_size=64)
    return f.embed(radiographs), g.embed(thickness)


def onnx_recall(radiograph_onnx: Path, thickness_onnx: Path, radiographs: np.ndarray, thickness: np.ndarray,
                subjects: list[str], threads: int | None, seed: int) -> dict[str, Any]:
    """``recall_vs_chance`` with the exported ONNX encoders on [N, 1, S, S] inputs, one per knee
    (first visits)."""
    queries, keys = onnx_embed(radiograph_onnx, thickness_onnx, radiographs, thickness, threads)
    return recall_vs_chance(queries, keys, subjects, seed)


def test_recall(radiograph_onnx: Path, thickness_onnx: Path, cache, array: str, threads: int | None,
                seed: int = 0) -> dict[str, Any]:
    """Recall@k on the test split with the exported ONNX encoders (the serving path).

    ``first_visit``: one query per knee (its first visit), gallery = those knees' maps (DESIGN.md),
    with the ratio to chance and subject-bootstrap intervals (``recall_vs_chance``).
    ``all_visits``: every knee-visit pair is a query, gallery = every test map (other visits of
    the same knee are competitors), a larger gallery and so a lower chance level.
    """
    from mris.training.sampler import first_visits
    from mris.evaluation.metrics import RECALL_AT, recall_at_k

    queries, keys = onnx_embed(radiograph_onnx, thickness_onnx, np.asarray(cache["radiograph"], np.float32)[:, None],
                               np.asarray(cache[array], np.float32)[:, None], threads)
    rows = cache.rows
    first = sorted(first_visits([r.knee_id for r in rows], [r.visit_month for r in rows]))
    out = {"first_visit": recall_vs_chance(queries[first], keys[first], [rows[i].subject_id for i in first], seed)}
    everything = list(range(len(rows)))
    recall = recall_at_k(queries @ keys.T)
    chance = {f"R@{k}": min(1.0, k / len(everything)) for k in RECALL_AT}
    out["all_visits"] = {"gallery": len(everything), "recall": recall, "chance": chance,
                         "ratio_to_chance": {k: recall[k] / chance[k] for k in chance}}
    return out


def manifest_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
