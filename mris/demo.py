"""``mris demo``: the main job on the synthetic cohort, end to end.

1. cohort  (``mris cohort``)        -> WORKDIR/cohort/manifest.csv
2. train   (``mris train``, quick)  -> WORKDIR/model/card.json (separate variant + localiser)
3. index   (``mris index build``, ``mris index calibrate`` on the downstream split)
                                    -> WORKDIR/index/current (published, calibrated intervals)
4. synthesis of held-out test radiographs through ``mris.pipeline.Pipeline`` (the service's
   code path, knees found by the localiser): neighbours, error against the true maps, a PNG.
5. with ``--evaluate``: ``mris evaluate`` (the paper's three tables) -> WORKDIR/evaluation/report.md

Each stage runs as its own ``mris`` command (so it shows its own progress bar and summary) and is
skipped when its output is already complete, so a second run reuses what is done; an interrupted
training resumes from its last checkpoint. Ctrl-C, SIGTERM or SIGHUP stop the running stage too
(``mris.subcommand``: the child gets SIGTERM and is waited for), so ``--serve`` never leaves its
``mris serve`` behind holding the port.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from rich.table import Table

from mris.constants import CARTILAGES
from mris.progress import make_console
from mris.subcommand import run_mris

console = make_console()


def prepare(workdir: Path, subjects: int, seed: int, epochs: int | None = None) -> dict[str, Path]:
    """Stages 1-3; returns the paths of the cohort manifest, model bundle and index root."""
    workdir.mkdir(parents=True, exist_ok=True)
    cohort, model, index = workdir / "cohort", workdir / "model", workdir / "index"
    manifest = cohort / "manifest.csv"

    console.rule("[bold]1/4 synthetic cohort")
    if manifest.is_file():
        console.print(f"reusing {manifest}")
    else:
        run_mris(
            "cohort",
            "--out",
            str(cohort),
            "--subjects",
            str(subjects),
            "--seed",
            str(seed),
            "--force",
        )

    console.rule("[bold]2/4 training (quick profile, separate variant, knee localiser)")
    if (model / "card.json").is_file():
        console.print(f"reusing {model}")
    else:
        run_json = workdir / "model.training" / "run.json"
        resume = ["--resume"] if run_json.is_file() else ["--force"]
        epoch_args = ["--epochs", str(epochs)] if epochs else []
        run_mris(
            "train",
            "--manifest",
            str(manifest),
            "--out",
            str(model),
            "--variant",
            "separate",
            "--profile",
            "quick",
            *epoch_args,
            *resume,
        )

    console.rule("[bold]3/4 index build, calibration and publish")
    if (index / "current").exists():
        console.print(f"reusing {index / 'current'} -> {(index / 'current').resolve().name}")
    else:
        run_mris(
            "index",
            "build",
            "--model",
            str(model),
            "--manifest",
            str(manifest),
            "--root",
            str(index),
            "--variant",
            "separate",
            "--publish",
        )
    if _calibrated(index):
        console.print("its intervals are calibrated (docs/UNCERTAINTY.md)")
    elif not _has_split(manifest, "downstream"):
        console.print("no downstream split to calibrate on: the SD is served uncalibrated")
    else:
        run_mris(
            "index",
            "calibrate",
            "--model",
            str(model),
            "--manifest",
            str(manifest),
            "--root",
            str(index),
            "--split",
            "downstream",
            "--publish",
        )
    return {"manifest": manifest, "model": model, "index": index}


def _has_split(manifest: Path, split: str) -> bool:
    from mris.manifest import read_manifest

    return bool(read_manifest(manifest).select([split]))


def _calibrated(index: Path) -> bool:
    from mris.index.card import read_card

    return read_card((index / "current").resolve()).calibration is not None


def _mae(pred: np.ndarray, truth: np.ndarray) -> float:
    both = np.isfinite(pred) & np.isfinite(truth)
    return float(np.mean(np.abs(pred[both] - truth[both]))) if both.any() else float("nan")


def _examples(radiographs: list[dict[str, object]], count: int) -> list[dict[str, object]]:
    """Which test radiographs the demo shows: different subjects, the first the healthiest
    (lowest worst KL grade of its two knees), the next the most osteoarthritic, then the rest in
    file order."""

    def worst_klg(rows: dict[str, object]) -> int:
        return max(-1 if row.klg is None else int(row.klg) for row in rows.values())

    ranked = sorted(radiographs, key=worst_klg)
    picks: list[dict[str, object]] = []
    subjects: set[str] = set()
    for candidates in (ranked, ranked[::-1], radiographs):
        for rows in candidates:
            subject = next(iter(rows.values())).subject_id
            if len(picks) < count and subject not in subjects:
                picks.append(rows)
                subjects.add(subject)
                break
    for rows in radiographs:  # more than two asked for: fill in file order
        subject = next(iter(rows.values())).subject_id
        if len(picks) < count and subject not in subjects:
            picks.append(rows)
            subjects.add(subject)
    return picks


def synthesize_examples(paths: dict[str, Path], workdir: Path, examples: int = 2) -> None:
    """Stage 4: synthesize held-out test radiographs exactly as the service does."""
    from mris.manifest import read_manifest
    from mris.pipeline import Pipeline, RequestOptions
    from mris.render import render_results_png
    from mris.thickness import load_thickness_map

    console.rule("[bold]4/4 synthesis of held-out test radiographs (the service's pipeline)")
    manifest = read_manifest(paths["manifest"])
    pipeline = Pipeline.load(paths["model"], paths["index"], variant="separate")
    by_radiograph: dict[str, dict[str, object]] = {}
    for row in manifest.select(["test"]):
        by_radiograph.setdefault(row.radiograph_path, {})[row.side] = row
    chosen = _examples([rows for rows in by_radiograph.values() if len(rows) == 2], examples)
    maes = {"fc": [], "tc": []}
    for number, rows in enumerate(chosen, start=1):
        any_row = next(iter(rows.values()))
        started = time.perf_counter()
        results = pipeline.run(manifest.resolve_path(any_row.radiograph_path), RequestOptions(k=20))
        elapsed_ms = (time.perf_counter() - started) * 1000
        truths = []
        table = Table(
            title=f"test radiograph {number}: {Path(any_row.radiograph_path).name} "
            f"({elapsed_ms:.0f} ms, knees found by the localiser)"
        )
        for column in (
            "knee",
            "KL",
            "true centre px",
            "found centre px",
            "top-3 fc neighbours (similarity)",
            "MAE fc mm",
            "MAE tc mm",
        ):
            table.add_column(column)
        for result in results:
            row = rows[result.side]
            truth = {
                "fc": load_thickness_map(manifest.resolve_path(row.fc_path)),
                "tc": load_thickness_map(manifest.resolve_path(row.tc_path)),
            }
            truths.append(truth)
            errors = {name: _mae(result.maps_mm[name], truth[name]) for name in CARTILAGES}
            for name in errors:
                maes[name].append(errors[name])
            top = ", ".join(
                f"{n.pair_id} ({n.similarity:.2f})" for n in result.neighbours["fc"][:3]
            )
            table.add_row(
                result.side,
                str(row.klg),
                f"{row.keypoint_x:.0f}, {row.keypoint_y:.0f}",
                f"{result.roi.centre_xy[0]:.0f}, {result.roi.centre_xy[1]:.0f}",
                top,
                f"{errors['fc']:.3f}",
                f"{errors['tc']:.3f}",
            )
        console.print(table)
        png = workdir / f"demo-synthesis-{number}.png"
        title = (
            f"{any_row.subject_id}, month {any_row.visit_month}: "
            + "; ".join(
                f"{result.side} KL {rows[result.side].klg}, MAE fc "
                f"{_mae(result.maps_mm['fc'], truth['fc']):.2f} / tc "
                f"{_mae(result.maps_mm['tc'], truth['tc']):.2f} mm"
                for result, truth in zip(results, truths)
            )
            + "; k = 20"
        )
        png.write_bytes(
            render_results_png(results, truth_mm=truths, title=title, coverage=pipeline.coverage)
        )
        console.print(f"wrote {png}")
    if maes["fc"]:
        console.print(
            f"[bold]mean absolute error over cartilage:[/] fc {np.mean(maes['fc']):.3f} mm, "
            f"tc {np.mean(maes['tc']):.3f} mm on {len(maes['fc'])} held-out knees"
        )


def run_demo(
    workdir: Path,
    subjects: int,
    seed: int,
    prepare_only: bool = False,
    serve: bool = False,
    port: int = 8000,
    epochs: int | None = None,
    evaluate: bool = False,
) -> None:
    started = time.perf_counter()
    paths = prepare(workdir, subjects, seed, epochs)
    if not prepare_only:
        synthesize_examples(paths, workdir)
    if evaluate:
        console.rule(
            "[bold]evaluation (--evaluate): the paper's three tables (trains the U-Net and "
            "the combined encoders)"
        )
        epoch_args = ["--epochs", str(epochs)] if epochs else []
        run_mris(
            "evaluate",
            "--manifest",
            str(paths["manifest"]),
            "--model",
            str(paths["model"]),
            "--index",
            str(paths["index"]),
            "--out",
            str(workdir / "evaluation"),
            *epoch_args,
        )
    console.print(
        f"[bold green]demo done[/] in {time.perf_counter() - started:.0f} s; everything is "
        f"in {workdir}"
    )
    if not evaluate:
        console.print(
            "the paper's three tables on this cohort: [bold]mris demo --evaluate[/] (about "
            "11 minutes more on 2 idle cores)"
        )
    if serve:
        console.print(
            f"serving on http://127.0.0.1:{port}/ (the viewer; API docs at /docs); Ctrl-C stops"
        )
        run_mris(
            "serve",
            "--model",
            str(paths["model"]),
            "--index-root",
            str(paths["index"]),
            "--port",
            str(port),
        )
