"""``mris synthesize-batch`` (registered by ``mris.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer

from mris.batch.plan import DEFAULT_SHARD_SIZE
from mris.options import DEFAULT_K, MAX_K
from mris.synthesis import DEFAULT_NAN_RULE


def register(app: typer.Typer) -> None:
    @app.command("synthesize-batch")
    def synthesize_batch(
        manifest: Path | None = typer.Option(
            None, exists=True, dir_okay=False, help="A manifest: each radiograph it names once."
        ),
        dicom_dir: Path | None = typer.Option(
            None, exists=True, file_okay=False, help="A folder: every file under it."
        ),
        out: Path = typer.Option(..., help="Output folder (rerun into it to resume)."),
        model: Path = typer.Option(Path("mris-demo/model"), help="Model bundle."),
        index: Path = typer.Option(
            Path("mris-demo/index"), help="Index root (its current) or bundle."
        ),
        splits: str | None = typer.Option(
            None, help="With --manifest: only these splits, comma-separated (e.g. test)."
        ),
        variant: str = typer.Option("separate", help="separate (MRIS-S) or combined (MRIS-C)."),
        k: int = typer.Option(DEFAULT_K, min=1, max=MAX_K, help="Neighbours per knee and region."),
        nan_rule: str = typer.Option(DEFAULT_NAN_RULE, help="majority or all (as the service)."),
        spacing_mm: float | None = typer.Option(None, help="Spacing for files without one."),
        engine: str = typer.Option("local", help="local (this process) or ray (Ray Data)."),
        ray_address: str | None = typer.Option(
            None, help="HOST:PORT of a Ray cluster's head (default: a local Ray cluster)."
        ),
        actors: int = typer.Option(2, min=1, help="--engine ray: pipeline actors."),
        cpus_per_actor: float = typer.Option(1.0, min=0.1, help="--engine ray: CPUs per actor."),
        gpus_per_actor: float = typer.Option(
            0.0, min=0.0, help="--engine ray: GPUs per actor (0: CPU actors)."
        ),
        shard_size: int = typer.Option(
            DEFAULT_SHARD_SIZE, min=1, help="Radiographs per shard (the unit of resume)."
        ),
        maps_dtype: str = typer.Option(
            "float16", help="float16, float32 or none (rows only, no map shards)."
        ),
        decode_workers: int = typer.Option(
            1, min=0, help="Decode sandbox processes per pipeline (0: decode in-process)."
        ),
        device: str = typer.Option("auto", help="--engine local: auto, cpu or cuda."),
        format: str = typer.Option("parquet", help="Rows format (parquet)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Synthesize both knees of every radiograph of a manifest or folder through the
        service's pipeline: a Parquet row per knee (ROI centre, neighbours, mean thickness and
        uncertainty per cartilage and compartment), the maps in .npy shards, and a failures
        table for inputs that gave no knee. Rerun the same command to resume: complete shards
        are kept, an interrupted shard is redone (docs/SCALE.md)."""
        import json

        from rich.table import Table

        from mris.batch.engines import PipelineSpec, run_batch
        from mris.batch.plan import MAPS_DTYPES, inputs_from_folder, inputs_from_manifest
        from mris.batch.shard import BatchSettings
        from mris.errors import BadParameter
        from mris.options import SynthesisOptions
        from mris.progress import make_console, progress_bar

        if (manifest is None) == (dicom_dir is None):
            raise BadParameter("give exactly one of --manifest and --dicom-dir")
        if format != "parquet":
            raise BadParameter("--format must be parquet")
        if maps_dtype not in (*MAPS_DTYPES, "none"):
            raise BadParameter(f"--maps-dtype must be one of {', '.join(MAPS_DTYPES)} or none")
        options = SynthesisOptions.parse(k=k, nan_rule=nan_rule, spacing_mm=spacing_mm)
        chosen = options.request_options()
        if manifest is not None:
            wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else []
            inputs = inputs_from_manifest(manifest, wanted)
        else:
            inputs = inputs_from_folder(dicom_dir)
        spec = PipelineSpec(
            model=str(model),
            bundle=str(index),
            variant=variant,
            device=device,
            sandbox_workers=decode_workers,
        )
        settings = BatchSettings(
            k=chosen.k,
            nan_rule=chosen.nan_rule,
            maps_dtype=None if maps_dtype == "none" else maps_dtype,
            spacing_mm=chosen.spacing_mm,
        )
        with progress_bar(progress) as bar:
            task = bar.add_task(
                f"synthesize-batch ({engine})", total=len(inputs.files), knees=0, rate=""
            )
            clock: dict[str, float] = {}

            def on_start(total: int, done: int) -> None:
                import time

                clock["start"] = time.perf_counter()
                bar.update(task, total=total, completed=done)

            def on_progress(inputs_done: int, knees: int) -> None:
                import time

                fields = bar.tasks[task].fields
                count = fields["knees"] + knees
                elapsed = max(time.perf_counter() - clock["start"], 1e-9)
                bar.update(
                    task,
                    advance=inputs_done,
                    knees=count,
                    description=f"synthesize-batch ({engine}) {count} knees, "
                    f"{count / elapsed:.1f} knees/s",
                )

            report = run_batch(
                inputs,
                out,
                spec,
                settings,
                shard_size=shard_size,
                engine=engine,
                ray_address=ray_address,
                actors=actors,
                cpus_per_actor=cpus_per_actor,
                gpus_per_actor=gpus_per_actor,
                on_start=on_start,
                on_progress=on_progress,
            )
        console = make_console()
        table = Table(title=f"synthesize-batch -> {out}")
        table.add_column("what")
        table.add_column("count", justify="right")
        table.add_row("radiographs", str(report.inputs))
        table.add_row("knees (rows)", str(report.knees))
        table.add_row("failures", str(report.failures))
        for reason, count in report.failure_reasons.items():
            table.add_row(f"  {reason}", str(count))
        table.add_row(
            "shards run / already complete", f"{report.shards_run} / {report.shards_skipped}"
        )
        table.add_row("this run", f"{report.seconds:.1f} s, {report.knees_per_second:.2f} knees/s")
        console.print(table)
        maps_note = f", maps: {out / 'maps'}" if settings.maps_dtype else ""
        console.print(f"rows: {out / 'rows'} (Parquet), failures: {out / 'failures'}{maps_note}")
        if not report.complete:  # pragma: no cover - every shard runs or raises
            console.print(json.dumps(report.__dict__))
            raise typer.Exit(1)
