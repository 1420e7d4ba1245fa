"""``mris train`` as a library call: cache -> localiser -> encoders per region -> export with
parity -> test recall -> model bundle. ``commands.py`` only translates the CLI to ``TrainRequest``.

``train`` is a sequence of named stages: ``load_run`` (-> ``TrainRun``), ``prepare_folders``,
``load_data`` (cache and validation split -> ``TrainData``), ``localiser_stage`` and
``region_stage`` per region (-> ``TrainedPart``), ``cache_test_split``, ``write_bundle``.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import PreprocessConfig
from mris.errors import BadParameter, ManifestError
from mris.fsutil import atomic_write_json, ensure_empty_output_dir, sha256_file
from mris.manifest import Manifest, ManifestRow, read_manifest
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
            raise BadParameter(
                f"--variant must be one of {', '.join(VARIANT_CHOICES)}, got {self.variant!r}"
            )
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


def split_validation(
    rows: list[ManifestRow], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Positions of training and validation rows of ``database``, held out by subject."""
    subjects = sorted({row.subject_id for row in rows})
    if len(subjects) < 2:
        raise ManifestError(
            "the database split needs at least 2 subjects (training and validation)"
        )
    order = np.random.default_rng([seed, 5]).permutation(len(subjects))
    n_val = min(len(subjects) - 1, max(1, math.ceil(fraction * len(subjects))))
    val_subjects = {subjects[i] for i in order[:n_val]}
    train = [i for i, row in enumerate(rows) if row.subject_id not in val_subjects]
    val = [i for i, row in enumerate(rows) if row.subject_id in val_subjects]
    return train, val


def region_array(region: str) -> str:
    return region  # cache array names equal region names: fc, tc, combined


def _run_identity(request: TrainRequest, profile: TrainProfile) -> dict[str, Any]:
    return {
        "format": RUN_FORMAT,
        "manifest_sha256": sha256_file(request.manifest),
        "profile": profile.to_dict(),
        "variants": request.variants,
        "seed": request.seed,
        "localiser": request.localiser,
        "init_weights": str(request.init_weights) if request.init_weights else None,
    }


@dataclass
class TrainRun:
    """What ``load_run`` checked: the manifest, its database rows, the profile and the device;
    ``identity`` is what ``--resume`` must match (``prepare_folders``)."""

    manifest: Manifest
    database: list[ManifestRow]
    profile: TrainProfile
    device: Any  # torch.device
    identity: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainData:
    """The cached inputs and the validation split (``load_data``)."""

    config: PreprocessConfig
    init: str  # the initialisation, as the card records it
    train_pos: list[int]
    val_pos: list[int]
    val_first: list[int]  # validation knees' first visits
    knee_ids: list[str]
    regions: list[tuple[str, str]]  # (variant, region) in training order
    needed: list[str]  # cache arrays
    cache_dir: Path
    cache: Any


@dataclass
class TrainedPart:
    """One trained piece of the bundle: the localiser or one region's encoder pair."""

    name: str
    summary: dict[str, Any]
    card: dict[str, Any]  # its entry in the model card
    files: list[tuple[Path, str]]  # (trained file, name in the bundle)
    history: list[dict[str, Any]] = field(default_factory=list)


class _StageBar:
    """A reporter stage made on the first progress call (its total is known only then); with
    ``per_round`` a new stage starts after each completed round (an epoch)."""

    def __init__(self, rep: Reporter, description: str, per_round: bool = False):
        self.rep, self.description, self.per_round = rep, description, per_round
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.rep.stage(self.description, total)
        self.rep.advance(self.task, done)
        if self.per_round and done == total:
            self.task = None


class _CacheBars:
    """One reporter stage per cache array (``build_cache``'s ``tick(name, done, total)``)."""

    def __init__(self, rep: Reporter):
        self.rep = rep
        self.bars: dict[str, _StageBar] = {}

    def __call__(self, name: str, done: int, total: int) -> None:
        self.bars.setdefault(name, _StageBar(self.rep, f"cache {name}"))(done, total)


def _log_localiser_epoch(
    rep: Reporter, epochs: tuple[int, int], stage: int, epoch: int, loss: float
) -> None:
    """``epochs``: the global and the refinement stage's number of epochs."""
    name, total = ("global", epochs[0]) if stage == 1 else ("refine", epochs[1])
    rep.log(f"localiser {name} epoch {epoch}/{total}: loss {loss:.3f}")


def load_run(request: TrainRequest) -> TrainRun:
    """Stage 1: read the manifest and check the request (profile, epochs, weights, device)."""
    from mris.training.trainer import pick_device

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
    return TrainRun(manifest=manifest, database=database, profile=profile, device=device)


def prepare_folders(request: TrainRequest, run: TrainRun) -> None:
    """Stage 2: the bundle and training folders and the run identity (``run.json``): a resumed
    run must match it; a new one starts from empty folders (``--force`` clears them)."""
    from mris.training.checkpoint import as_stored, check_resumable

    train_dir = request.train_dir
    run.identity = as_stored(_run_identity(request, run.profile))
    run_json = train_dir / "run.json"
    if request.resume:
        check_resumable(run_json, run.identity, "training run")
        request.out.mkdir(parents=True, exist_ok=True)
        return
    ensure_empty_output_dir(request.out, request.force)
    if train_dir.exists():
        if not request.force and run_json.is_file():
            raise FileExistsError(
                f"{train_dir} holds a training run: use --resume to continue it "
                "or --force to restart"
            )
        for child in ("separate-fc", "separate-tc", "combined-combined", "localiser"):
            shutil.rmtree(train_dir / child, ignore_errors=True)
    train_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_json, run.identity)


def load_data(request: TrainRequest, run: TrainRun, rep: Reporter) -> TrainData:
    """Stage 3: seeds and threads, the database cache and the validation split (held out by
    subject; one first visit per validation knee)."""
    import torch

    from mris.training.cache import build_cache
    from mris.training.sampler import first_visits
    from mris.training.trainer import set_determinism

    profile, database = run.profile, run.database
    set_determinism(request.seed, request.threads)
    config = PreprocessConfig(encoder_px=profile.encoder_px)
    init = (
        f"weights from {request.init_weights}"
        if request.init_weights
        else "RANDOM initialisation (no --init-weights given; the paper starts from ImageNet)"
    )
    rep.log(
        f"device {run.device}, {torch.get_num_threads()} threads, profile {profile.name}, "
        f"encoders: {init}"
    )

    train_pos, val_pos = split_validation(database, profile.val_fraction, request.seed)
    regions = [
        (variant, region) for variant in request.variants for region in VARIANT_REGIONS[variant]
    ]
    needed = ["radiograph"] + sorted({region_array(region) for _, region in regions})
    cache_dir = request.train_dir / "cache"
    cache = build_cache(
        request.manifest, run.manifest, database, config, cache_dir, needed, tick=_CacheBars(rep)
    )
    knee_ids = [row.knee_id for row in database]
    months = [row.visit_month for row in database]
    val_first = [
        val_pos[i]
        for i in first_visits([knee_ids[p] for p in val_pos], [months[p] for p in val_pos])
    ]
    if len(val_first) < 2:
        raise ManifestError(
            "the validation subjects hold fewer than 2 knees; add database subjects"
        )
    rep.log(
        f"database: {len(database)} pairs, {len({knee_ids[p] for p in train_pos})} training "
        f"knees, {len(val_first)} validation knees (held out by subject)"
    )
    return TrainData(
        config=config,
        init=init,
        train_pos=train_pos,
        val_pos=val_pos,
        val_first=val_first,
        knee_ids=knee_ids,
        regions=regions,
        needed=needed,
        cache_dir=cache_dir,
        cache=cache,
    )


def localiser_stage(
    request: TrainRequest, run: TrainRun, data: TrainData, rep: Reporter
) -> TrainedPart:
    """Stage 4: train the knee localiser (reused when ``done.json`` says it finished), then
    measure it on the test split (else the database)."""
    from mris.localiser import REFINE_FILE, KneeLocaliser, LocaliserConfig, evaluate_localiser
    from mris.training.localiser import train_localiser

    loc_dir = request.train_dir / "localiser"
    done_file = loc_dir / "done.json"
    if not done_file.is_file():
        loc_dir.mkdir(parents=True, exist_ok=True)
        result = train_localiser(
            run.manifest,
            [run.database[p] for p in data.train_pos],
            run.profile.localiser,
            loc_dir,
            data.cache_dir,
            run.device,
            request.seed,
            tick=_StageBar(rep, "localiser data"),
            on_epoch=partial(
                _log_localiser_epoch,
                rep,
                (run.profile.localiser.global_epochs, run.profile.localiser.refine_epochs),
            ),
        )
        atomic_write_json(
            done_file,
            {
                "config": result.config.to_dict(),
                "seconds": round(result.seconds, 1),
                "images": result.images,
                "patches": result.patches,
                "final_loss": [result.global_loss[-1], result.refine_loss[-1]],
            },
        )
    loc_info = json.loads(done_file.read_text())
    loc_config = LocaliserConfig.from_dict(loc_info["config"])
    localiser = KneeLocaliser(
        loc_dir / "localiser.onnx", loc_dir / REFINE_FILE, loc_config, request.threads
    )
    eval_split = "test" if run.manifest.select(["test"]) else "database"
    loc_metrics = evaluate_localiser(localiser, run.manifest, eval_split)
    rep.log(
        f"localiser on {eval_split}: median {loc_metrics['median_error_mm']:.2f} mm, "
        f"95th pct {loc_metrics['p95_error_mm']:.2f} mm, "
        f"max {loc_metrics['max_error_mm']:.2f} mm, both knees found on "
        f"{100 * loc_metrics['all_knees_found_fraction']:.1f} % of "
        f"{loc_metrics['images']} images"
    )
    summary = {**loc_metrics, "train_seconds": loc_info["seconds"]}
    outputs = {
        "localiser.onnx": [
            "centres [N,2,2] fractions (x,y), knee 0 = patient RIGHT",
            "confidence [N,2]",
        ],
        REFINE_FILE: ["offset [N,2] patch px", "confidence [N]"],
    }
    card = {
        "file": "localiser.onnx",
        "input_px": list(loc_config.global_input_px),
        "details": {
            "refine_file": REFINE_FILE,
            "config": loc_config.to_dict(),
            "outputs": outputs,
            "metrics": summary,
        },
    }
    files = [(loc_dir / name, name) for name in ("localiser.onnx", REFINE_FILE)]
    return TrainedPart(name="localiser", summary=summary, card=card, files=files)


def cache_test_split(request: TrainRequest, run: TrainRun, data: TrainData, rep: Reporter):
    """Stage 5: the test split's cache (``None`` without test rows), for the test recall."""
    from mris.training.cache import build_cache

    test_rows = run.manifest.select(["test"])
    if not test_rows:
        return None
    return build_cache(
        request.manifest,
        run.manifest,
        test_rows,
        data.config,
        data.cache_dir,
        data.needed,
        tick=_CacheBars(rep),
    )


def region_stage(
    request: TrainRequest,
    run: TrainRun,
    data: TrainData,
    variant: str,
    region: str,
    test_cache,
    rep: Reporter,
) -> TrainedPart:
    """Stage 6, per region: train (or resume) the encoder pair, export both to ONNX, check
    parity, measure validation (and test) recall with the exported encoders."""
    from mris.training.export import check_encoder_parity, export_onnx
    from mris.training.trainer import RegionData, RegionTrainer

    name = f"{variant}-{region}"
    profile, cache, val_first = run.profile, data.cache, data.val_first
    thickness = cache[region_array(region)]
    region_data = RegionData(
        radiographs=cache["radiograph"],
        thickness=thickness,
        train_rows=data.train_pos,
        train_knees=[data.knee_ids[p] for p in data.train_pos],
        val_rows=val_first,
    )
    region_dir = request.train_dir / name
    resume_region = request.resume and (region_dir / "last.pt").is_file()
    init_weights = str(request.init_weights) if request.init_weights else None
    trainer = RegionTrainer(
        name=name,
        data=region_data,
        profile=profile,
        work_dir=region_dir,
        device=run.device,
        seed=request.seed,
        init_weights=init_weights,
        log=rep.log,
        on_batch=_StageBar(rep, f"{name} epoch", per_round=True),
        on_epoch=rep.epoch,
    )
    result = trainer.fit(resume=resume_region)
    trainer.load_best()
    f_cpu, g_cpu = trainer.f.float().cpu().eval(), trainer.g.float().cpu().eval()
    s = profile.encoder_px
    thickness_px = (2 * s, s) if region == "combined" else (s, s)
    stem = variant if region == "combined" else name  # file names as mris.model_bundle lays out
    names = {"radiograph": f"{stem}-radiograph.onnx", "thickness": f"{stem}-thickness.onnx"}
    export_dir = region_dir / "export"
    radiograph_onnx = export_dir / names["radiograph"]
    thickness_onnx = export_dir / names["thickness"]
    export_onnx(f_cpu, radiograph_onnx, (s, s), ["embedding"])
    export_onnx(g_cpu, thickness_onnx, thickness_px, ["embedding"])
    val_x = np.asarray(cache["radiograph"][np.sort(val_first)], np.float32)[:, None]
    val_y = np.asarray(thickness[np.sort(val_first)], np.float32)[:, None]
    parity = check_encoder_parity(
        f_cpu, g_cpu, radiograph_onnx, thickness_onnx, val_x, val_y, threads=request.threads
    )
    max_diff = max(parity.max_abs_diff_radiograph, parity.max_abs_diff_thickness)
    same = parity.val_queries - parity.top20_order_mismatches
    rep.log(
        f"{name}: ONNX parity max abs diff {max_diff:.1e}, top-20 order identical on "
        f"{same}/{parity.val_queries} validation queries"
    )
    val_subjects = [run.database[p].subject_id for p in np.sort(val_first)]
    summary: dict[str, Any] = {
        "best_epoch": result.best_epoch,
        "validation": result.best_metrics,
        "validation_first_visit": onnx_recall(
            radiograph_onnx,
            thickness_onnx,
            val_x,
            val_y,
            val_subjects,
            request.threads,
            request.seed,
        ),
        "parity": parity.to_dict(),
        "train_seconds": round(result.seconds, 1),
        "images_per_second": round(result.images_per_second, 1),
    }
    held_out = summary["validation_first_visit"]
    rep.log(
        f"{name}: validation recall (held-out subjects' first visits, gallery "
        f"{held_out['gallery']}): "
        + ", ".join(
            f"{k} {100 * r:.1f} % ({held_out['ratio_to_chance'][k]:.1f}x chance)"
            for k, r in held_out["recall"].items()
        )
    )
    if test_cache is not None:
        summary["test"] = test_recall(
            radiograph_onnx,
            thickness_onnx,
            test_cache,
            region_array(region),
            request.threads,
            request.seed,
        )
        t = summary["test"]["first_visit"]
        rep.log(
            f"{name}: test recall (first visits, gallery {t['gallery']}): "
            + ", ".join(f"{k} {100 * v:.1f} %" for k, v in t["recall"].items())
            + f"; chance R@20 {100 * t['chance']['R@20']:.1f} % "
            f"({t['ratio_to_chance']['R@20']:.1f}x)"
        )
    card = {
        "radiograph": names["radiograph"],
        "thickness": names["thickness"],
        "radiograph_input_px": [s, s],
        "thickness_input_px": list(thickness_px),
        "embedding_dim": 512,
    }
    files = [
        (export_dir / names[modality], names[modality]) for modality in ("radiograph", "thickness")
    ]
    return TrainedPart(name=name, summary=summary, card=card, files=files, history=result.history)


def write_bundle(
    request: TrainRequest,
    run: TrainRun,
    data: TrainData,
    localiser: TrainedPart | None,
    regions: list[TrainedPart],
    started: float,
) -> dict[str, Any]:
    """Stage 7: copy the trained files into the bundle, write the logs, then the card (last, so
    a bundle without it is incomplete). Returns the summary (the card's metrics)."""
    import torch

    from mris.training.export import write_bundle_card
    from mris.training.trainer import write_logs

    summary: dict[str, Any] = {
        "regions": {part.name: part.summary for part in regions},
        "device": str(run.device),
        "init": data.init,
    }
    card_variants: dict[str, Any] = {}
    for (variant, region), part in zip(data.regions, regions):
        card_variants.setdefault(variant, {"regions": {}})["regions"][region] = part.card
    parts = ([localiser] if localiser is not None else []) + regions
    if localiser is not None:
        summary["localiser"] = localiser.summary
    for part in parts:
        for source, name in part.files:
            shutil.copyfile(source, request.out / name)
    history = [record for part in regions for record in part.history]
    if history:
        write_logs(request.out, history, len(data.val_first))
        (request.out / "log.json").unlink(missing_ok=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    database, knee_ids = run.database, data.knee_ids
    training_info = {
        "profile": run.profile.to_dict(),
        "variants": request.variants,
        "seed": request.seed,
        "device": str(run.device),
        "threads": torch.get_num_threads(),
        "init": data.init,
        "manifest_sha256": run.identity["manifest_sha256"],
        "database_pairs": len(database),
        "train_knees": len({knee_ids[p] for p in data.train_pos}),
        "validation_knees": len(data.val_first),
        "validation_subjects": sorted({database[p].subject_id for p in data.val_pos}),
        "method": "MRIS (Chen & Niethammer 2023): ResNet-18 pair, triplet loss m=0.1 one "
        "direction, one visit per knee per epoch, AdamW",
    }
    write_bundle_card(
        request.out,
        {
            "preprocess": data.config.to_dict(),
            "variants": card_variants,
            "localiser": localiser.card if localiser is not None else None,
            "training": training_info,
            "metrics": summary,
        },
    )
    return summary


def train(request: TrainRequest, reporter: Reporter | None = None) -> dict[str, Any]:
    """Run the whole training; returns the summary (also stored in the card's metrics)."""
    rep = reporter or Reporter()
    started = time.perf_counter()
    run = load_run(request)
    prepare_folders(request, run)
    data = load_data(request, run, rep)
    localiser = localiser_stage(request, run, data, rep) if request.localiser else None
    test_cache = cache_test_split(request, run, data, rep)
    regions = [
        region_stage(request, run, data, variant, region, test_cache, rep)
        for variant, region in data.regions
    ]
    return write_bundle(request, run, data, localiser, regions, started)


RECALL_RESAMPLES = 1000


def recall_vs_chance(
    queries: np.ndarray, keys: np.ndarray, subjects: list[str], seed: int
) -> dict[str, Any]:
    """Recall@1/5/10/20 of queries [Q, D] against their own keys [Q, D] (the gallery = all keys):
    recall, chance (k / gallery), the ratio to chance and 95 % intervals from resampling subjects
    (``mris.evaluation.tables.retrieval_row``, the evaluation's Table 1 row, without its curve)."""
    from mris.evaluation.tables import retrieval_row

    row = retrieval_row(queries, keys, subjects, RECALL_RESAMPLES, seed)
    row.pop("curve")
    return row


def onnx_embed(
    radiograph_onnx: Path,
    thickness_onnx: Path,
    radiographs: np.ndarray,
    thickness: np.ndarray,
    threads: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of [N, 1, S, S] radiograph and thickness inputs by the exported ONNX encoders
    (the serving path)."""
    from mris.encoders import OnnxEncoder

    f = OnnxEncoder(radiograph_onnx, device="cpu", intra_op_threads=threads, batch_size=64)
    g = OnnxEncoder(thickness_onnx, device="cpu", intra_op_threads=threads, batch_size=64)
    return f.embed(radiographs), g.embed(thickness)


def onnx_recall(
    radiograph_onnx: Path,
    thickness_onnx: Path,
    radiographs: np.ndarray,
    thickness: np.ndarray,
    subjects: list[str],
    threads: int | None,
    seed: int,
) -> dict[str, Any]:
    """``recall_vs_chance`` with the exported ONNX encoders on [N, 1, S, S] inputs, one per knee
    (first visits)."""
    queries, keys = onnx_embed(radiograph_onnx, thickness_onnx, radiographs, thickness, threads)
    return recall_vs_chance(queries, keys, subjects, seed)


def test_recall(
    radiograph_onnx: Path,
    thickness_onnx: Path,
    cache,
    array: str,
    threads: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Recall@k on the test split with the exported ONNX encoders (the serving path).

    ``first_visit``: one query per knee (its first visit), gallery = those knees' maps (DESIGN.md),
    with the ratio to chance and subject-bootstrap intervals (``recall_vs_chance``).
    ``all_visits``: every knee-visit pair is a query, gallery = every test map (other visits of
    the same knee are competitors), a larger gallery and so a lower chance level.
    """
    from mris.evaluation.metrics import RECALL_AT, recall_at_k
    from mris.training.sampler import first_visits

    queries, keys = onnx_embed(
        radiograph_onnx,
        thickness_onnx,
        np.asarray(cache["radiograph"], np.float32)[:, None],
        np.asarray(cache[array], np.float32)[:, None],
        threads,
    )
    rows = cache.rows
    first = sorted(first_visits([r.knee_id for r in rows], [r.visit_month for r in rows]))
    out = {
        "first_visit": recall_vs_chance(
            queries[first], keys[first], [rows[i].subject_id for i in first], seed
        )
    }
    everything = list(range(len(rows)))
    recall = recall_at_k(queries @ keys.T)
    chance = {f"R@{k}": min(1.0, k / len(everything)) for k in RECALL_AT}
    out["all_visits"] = {
        "gallery": len(everything),
        "recall": recall,
        "chance": chance,
        "ratio_to_chance": {k: recall[k] / chance[k] for k in chance},
    }
    return out


def manifest_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
