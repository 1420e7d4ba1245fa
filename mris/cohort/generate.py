"""Orchestration: subjects -> files on disk, manifest, stats, preview.

Subject by subject (optionally in a process pool), each subject from its own generator
seeded by ``(seed, subject index)``, so the output is identical whatever the worker count.
Each worker writes its subject's DICOMs and maps and returns only manifest rows and a few
numbers per knee-visit, so memory stays bounded for any cohort size. The manifest is written
last, atomically: an interrupted run leaves no complete-looking manifest.

Layout under ``out``::

    manifest.csv  cohort_stats.json  preview.png
    radiographs/S0001/S0001_024.dcm          one per subject-visit (both knees)
    maps/S0001/S0001_R_024_fc.npy, ..._tc.npy  one pair per knee-visit
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from mris.cohort import dicom_writer, radiograph
from mris.cohort.latent import (
    SubjectLatent,
    assign_splits,
    is_progressor,
    knee_state,
    sample_subject,
)
from mris.cohort.maps import joint_space_mm, thickness_maps
from mris.cohort.stats import KneeVisitRecord, cohort_stats
from mris.fsutil import atomic_write_json, ensure_empty_output_dir
from mris.manifest import ManifestRow, write_manifest

IMAGE_SIZES = ("small", "medium", "full")
DEFAULT_GRID = {"small": 128, "medium": 128, "full": 310}


@dataclass(frozen=True)
class CohortPreset:
    """Defaults of ``mris cohort --preset``; explicit options override them."""

    subjects: int
    image_size: str
    description: str


PRESETS: dict[str, CohortPreset] = {
    # The demo: 300 subjects at about 1.1 mm/px, enough for the quick profile's 64 px input.
    "demo": CohortPreset(300, "small", "300 subjects, small images (0.96-1.18 mm/px)"),
    # The evaluation cohort: 1,400 subjects give 270 test subjects (540 knees at the first
    # visit, a recall@20 chance level under 4 %); 0.80-0.98 mm/px is at least as fine as a
    # 128 px encoder input (140 mm / 128 px = 1.09 mm/px).
    "eval": CohortPreset(1400, "medium", "1,400 subjects, medium images (0.80-0.98 mm/px)"),
}
SIDE_CODE = {"RIGHT": "R", "LEFT": "L"}


@dataclass(frozen=True)
class CohortConfig:
    out: Path
    subjects: int = 300
    seed: int = 7
    image_size: str = "small"
    grid: int | None = None
    workers: int | None = None

    @property
    def grid_cells(self) -> int:
        return self.grid or DEFAULT_GRID[self.image_size]


@dataclass
class SubjectResult:
    rows: list[ManifestRow] = field(default_factory=list)
    records: list[KneeVisitRecord] = field(default_factory=list)


def visit_rng(seed: int, index: int, month: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), 4, int(index), int(month)]))


def _write_plain(path: Path, write: Callable[[Any], None]) -> None:
    """Write under a temporary name and rename (no fsync: the manifest is the commit point)."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as handle:
        write(handle)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    _write_plain(path, lambda handle: np.save(handle, array, allow_pickle=False))


def subject_knee_visits(subject: SubjectLatent, grid: int):
    """Yield (month, side, state, maps, jsw) for every knee-visit of a subject (no rendering)."""
    for month in subject.visits:
        for side, knee in subject.knees.items():
            state = knee_state(knee, month)
            maps = thickness_maps(knee, state, grid)
            yield month, side, state, maps, joint_space_mm(knee, state, maps.central_mm)


def block_means(thickness_mm: np.ndarray, blocks: int = 8) -> list[float]:
    """Means of a ``blocks x blocks`` partition of a map (NaN for a block wholly outside)."""
    edges = np.linspace(0, thickness_mm.shape[0], blocks + 1).astype(int)
    out = []
    for r0, r1 in pairwise(edges):
        for c0, c1 in pairwise(edges):
            block = thickness_mm[r0:r1, c0:c1]
            inside = block[~np.isnan(block)]
            out.append(float(inside.mean()) if inside.size else float("nan"))
    return out


def visible_latents(subject: SubjectLatent, side: str, state, jsw) -> tuple[float, ...]:
    """What the radiograph shows of a knee-visit, in ``stats.VISIBLE_LATENTS`` order."""
    anat = subject.knees[side].anatomy
    return (
        jsw[0],
        jsw[1],
        state.osteophyte_mm,
        state.sclerosis,
        float(state.klg),
        anat.alignment_deg,
        anat.femur_width,
        anat.plateau_width,
        anat.notch_width,
        anat.medial_share,
        anat.condyle_ry_medial,
        anat.condyle_ry_lateral,
        anat.spine_height,
        float(subject.sex == "M"),
    )


def make_record(subject: SubjectLatent, side: str, month: int, state, maps, jsw) -> KneeVisitRecord:
    knee = subject.knees[side]
    fc_inside = maps.fc[~np.isnan(maps.fc)]
    return KneeVisitRecord(
        subject_id=subject.subject_id,
        side=side,
        month=month,
        sex=subject.sex,
        klg=state.klg,
        progressor=is_progressor(knee),
        fc_mean_mm=float(np.nanmean(maps.fc)),
        tc_mean_mm=float(np.nanmean(maps.tc)),
        fc_nan_share=float(np.isnan(maps.fc).mean()),
        tc_nan_share=float(np.isnan(maps.tc).mean()),
        jsw_medial_mm=jsw[0],
        jsw_lateral_mm=jsw[1],
        fc_medial_mm=float(np.nanmean(maps.fc[:, : maps.fc.shape[1] // 2])),
        fc_lateral_mm=float(np.nanmean(maps.fc[:, maps.fc.shape[1] // 2 :])),
        tc_medial_mm=float(np.nanmean(maps.tc[:, : maps.tc.shape[1] // 2])),
        tc_lateral_mm=float(np.nanmean(maps.tc[:, maps.tc.shape[1] // 2 :])),
        jsw_worse_mm=jsw[0] if knee.worse_compartment == "medial" else jsw[1],
        fc_denuded_share=float((fc_inside < 0.1).mean()) if fc_inside.size else 0.0,
        visible=visible_latents(subject, side, state, jsw),
        cells_mm=tuple(block_means(maps.fc) + block_means(maps.tc)),
    )


def generate_subject(config: CohortConfig, index: int, split: str) -> SubjectResult:
    """Draw, render and write one subject; return its manifest rows and stats records."""
    subject = sample_subject(config.seed, index, config.subjects, split)
    out = config.out
    sid = subject.subject_id
    (out / "radiographs" / sid).mkdir(parents=True, exist_ok=True)
    (out / "maps" / sid).mkdir(parents=True, exist_ok=True)
    result = SubjectResult()
    by_month: dict[int, list] = {}
    for month, side, state, maps, jsw in subject_knee_visits(subject, config.grid_cells):
        by_month.setdefault(month, []).append((side, state, maps, jsw))

    for month, knees in by_month.items():
        rng = visit_rng(config.seed, index, month)
        positioning = radiograph.sample_positioning(rng)
        full_spacing = float(
            rng.choice(radiograph.FULL_SPACINGS_MM, p=radiograph.FULL_SPACING_WEIGHTS)
        )
        spacing = radiograph.spacing_for_size(config.image_size, full_spacing)
        choices = dicom_writer.draw_choices(rng)
        states = {side: state for side, state, _, _ in knees}
        jsws = {side: jsw for side, _, _, jsw in knees}
        image = radiograph.render_radiograph(
            subject.knees, states, jsws, positioning, spacing, rng, bmi=subject.bmi
        )
        dcm_rel = f"radiographs/{sid}/{sid}_{month:03d}.dcm"
        ds = dicom_writer.build_dataset(
            image.pixels,
            spacing,
            choices,
            seed=config.seed,
            subject_id=sid,
            sex=subject.sex,
            age=subject.age,
            month=month,
            magnification=positioning.magnification,
        )
        dicom_writer.write_dicom(out / dcm_rel, ds, choices.transfer_syntax)

        for side, state, maps, jsw in knees:
            pair_id = f"{sid}_{SIDE_CODE[side]}_{month:03d}"
            fc_rel = f"maps/{sid}/{pair_id}_fc.npy"
            tc_rel = f"maps/{sid}/{pair_id}_tc.npy"
            _save_npy(out / fc_rel, maps.fc)
            _save_npy(out / tc_rel, maps.tc)
            kx, ky = image.centres_px[side]
            knee = subject.knees[side]
            result.rows.append(
                ManifestRow(
                    pair_id=pair_id,
                    subject_id=sid,
                    side=side,
                    visit_month=month,
                    radiograph_path=dcm_rel,
                    fc_path=fc_rel,
                    tc_path=tc_rel,
                    split=split,
                    keypoint_x=round(kx, 2),
                    keypoint_y=round(ky, 2),
                    klg=state.klg,
                    progressor=is_progressor(knee),
                    extra={
                        "sex": subject.sex,
                        "age": f"{subject.age + month / 12:.1f}",
                        "bmi": f"{subject.bmi:.1f}",
                        "spacing_mm": f"{spacing:g}",
                        "magnification": f"{positioning.magnification:.3f}",
                        "jsw_medial_mm": f"{jsw[0]:.3f}",
                        "jsw_lateral_mm": f"{jsw[1]:.3f}",
                        "osteophyte_mm": f"{state.osteophyte_mm:.2f}",
                        "fast_progressor": str(int(knee.fast_progressor)),
                    },
                )
            )
            result.records.append(make_record(subject, side, month, state, maps, jsw))
    return result


def _subject_task(args: tuple[CohortConfig, int, str]) -> SubjectResult:
    config, index, split = args
    return generate_subject(config, index, split)


def iter_subjects(config: CohortConfig) -> Iterator[SubjectResult]:
    """Results in subject order, from a pool of ``config.workers`` processes (1 = in-process)."""
    splits = assign_splits(config.subjects, config.seed)
    tasks = [(config, i, splits[i]) for i in range(config.subjects)]
    workers = config.workers if config.workers is not None else (os.cpu_count() or 1)
    workers = max(1, min(workers, config.subjects))
    if workers == 1:
        for task in tasks:
            yield _subject_task(task)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_subject_task, tasks, chunksize=4)


@dataclass
class CohortSummary:
    out: Path
    n_subjects: int
    n_pairs: int
    n_radiographs: int
    seconds: float
    disk_bytes: int
    stats: dict[str, Any]


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def generate_cohort(
    config: CohortConfig, force: bool = False, on_subject: Callable[[int], None] | None = None
) -> CohortSummary:
    """Write the whole cohort into ``config.out``; see the module docstring for the layout."""
    if config.image_size not in IMAGE_SIZES:
        raise ValueError(f"image size must be one of {', '.join(IMAGE_SIZES)}")
    if config.subjects < 1:
        raise ValueError("subjects must be at least 1")
    ensure_empty_output_dir(config.out, force)
    (config.out / "manifest.csv").unlink(missing_ok=True)  # --force: no stale manifest meanwhile
    start = time.perf_counter()
    rows: list[ManifestRow] = []
    records: list[KneeVisitRecord] = []
    for done, result in enumerate(iter_subjects(config), start=1):
        rows.extend(result.rows)
        records.extend(result.records)
        if on_subject:
            on_subject(done)
    stats = cohort_stats(records, n_subjects=config.subjects)
    stats["config"] = {
        "subjects": config.subjects,
        "seed": config.seed,
        "image_size": config.image_size,
        "grid": config.grid_cells,
    }
    stats["pairs_per_split"] = {
        s: sum(r.split == s for r in rows) for s in ("database", "downstream", "test")
    }
    # The retrieval test gallery: test knees at their first visit (month 0 for every knee).
    stats["test_knees_first_visit"] = sum(r.split == "test" and r.visit_month == 0 for r in rows)
    spacings = [float(r.extra["spacing_mm"]) for r in rows]
    stats["spacing_mm"] = {"min": min(spacings), "max": max(spacings)} if spacings else {}
    atomic_write_json(config.out / "cohort_stats.json", stats)
    from mris.cohort.preview import write_preview

    write_preview(config.out, rows)
    write_manifest(config.out / "manifest.csv", rows)
    seconds = time.perf_counter() - start
    return CohortSummary(
        out=config.out,
        n_subjects=config.subjects,
        n_pairs=len(rows),
        n_radiographs=len({r.radiograph_path for r in rows}),
        seconds=seconds,
        disk_bytes=_disk_bytes(config.out),
        stats=stats,
    )


def simulate_records(n_subjects: int, seed: int, grid: int) -> list[KneeVisitRecord]:
    """Latents and maps only (no radiographs, nothing written): what the realism test checks."""
    splits = assign_splits(n_subjects, seed)
    records: list[KneeVisitRecord] = []
    for index in range(n_subjects):
        subject = sample_subject(seed, index, n_subjects, splits[index])
        for month, side, state, maps, jsw in subject_knee_visits(subject, grid):
            records.append(make_record(subject, side, month, state, maps, jsw))
    return records


def iter_records(results: Iterable[SubjectResult]) -> Iterator[KneeVisitRecord]:
    for result in results:
        yield from result.records
