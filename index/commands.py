"""``mris index build | verify | list | gc`` (registered by ``mris.cli``)."""

from __future__ import annotations

from pathlib import Path

import typer


def _size(num_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num_bytes < 1024 or unit == "TiB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""  # pragma: no cover


def register(app: typer.Typer) -> None:
    index_app = typer.Typer(
        help="Build, verify, list and garbage-collect index bundles.", no_args_is_help=True
    )
    app.add_typer(index_app, name="index")

    @index_app.command("build")
    def build(
        model: Path = typer.Option(
            ..., "--model", help="Model bundle directory (ONNX encoders + card.json)."
        ),
        manifest: Path = typer.Option(..., "--manifest", help="Manifest CSV/Parquet."),
        root: Path = typer.Option(
            ..., "--root", help="Index root; the bundle goes to ROOT/<version>/."
        ),
        splits: list[str] = typer.Option(
            ["database"], "--splits", help="Split(s) that form the database."
        ),
        variant: str = typer.Option("separate", "--variant", help="separate | combined"),
        kind: str = typer.Option("flat", "--kind", help="flat (exact) | auto | ivf | ivfpq"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda (ONNX encoders)"),
        publish: bool = typer.Option(
            False, "--publish", help="Point ROOT/current at the new version."
        ),
        append: str | None = typer.Option(
            None, "--append", help="Start from this version (or 'current') and embed only new rows."
        ),
        skip_missing: bool = typer.Option(
            False,
            "--skip-missing",
            help="Skip rows whose maps are missing, unreadable or all NaN (counted).",
        ),
        maps_dtype: str = typer.Option(
            "float32", "--maps-dtype", help="float32 | float16 (see docs/INDEX.md)."
        ),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Encoder batch size."),
        threads: int = typer.Option(
            0, "--threads", min=0, help="CPU threads for ONNX and FAISS (0: all usable)."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
        engine: str = typer.Option(
            "local", "--engine", help="local (this process) or ray (Ray actors embed the maps)."
        ),
        ray_address: str | None = typer.Option(
            None, "--ray-address", help="HOST:PORT of a Ray cluster (default: a local one)."
        ),
        actors: int = typer.Option(2, "--actors", min=1, help="--engine ray: encoder actors."),
        cpus_per_actor: float = typer.Option(
            1.0, "--cpus-per-actor", min=0.1, help="--engine ray: CPUs per actor."
        ),
        gpus_per_actor: float = typer.Option(
            0.0, "--gpus-per-actor", min=0.0, help="--engine ray: GPUs per actor."
        ),
    ) -> None:
        """Embed the manifest's maps, build the FAISS index(es), verify, and (with --publish)
        publish."""
        from mris.errors import BadParameter
        from mris.index.build import EngineOptions, build_index_bundle
        from mris.progress import console, progress_bar

        if engine not in ("local", "ray"):
            raise BadParameter(f"--engine must be local or ray, not {engine!r}")
        engine_options = EngineOptions(
            kind=engine,
            ray_address=ray_address,
            actors=actors,
            cpus_per_actor=cpus_per_actor,
            gpus_per_actor=gpus_per_actor,
        )
        with progress_bar(enabled=not quiet) as bar:
            task = {}

            def on_start(total: int) -> None:
                task["id"] = bar.add_task("embedding maps", total=total)

            def on_progress(done: int) -> None:
                bar.advance(task["id"], done)

            result = build_index_bundle(
                model,
                manifest,
                root,
                splits=splits,
                variant=variant,
                kind=kind,
                device=device,
                publish=publish,
                append_from=append,
                skip_missing=skip_missing,
                maps_dtype=maps_dtype,
                batch_size=batch_size,
                threads=threads or None,
                on_start=on_start,
                on_progress=on_progress,
                engine=engine_options,
            )
        card = result.card
        kinds = ", ".join(
            f"{region}: {rc.kind}"
            + (f" nprobe {rc.nprobe}, recall@20 {rc.recall_at_20:.4f}" if rc.kind != "flat" else "")
            for region, rc in card.regions.items()
        )
        skipped = ", ".join(f"{len(p)} {reason}" for reason, p in result.skipped.items()) or "none"
        console.print(
            f"[bold green]built[/] {result.path}\n"
            f"  maps: {result.new_rows} embedded ({result.maps_per_second:.1f} maps/s), "
            f"{result.reused_rows} reused, {result.rows} rows in all; skipped: {skipped}\n"
            f"  index: {kinds}\n"
            f"  size on disk: {_size(result.size_bytes)}; {result.seconds:.1f} s"
            + (f"\n  published: {root}/current -> {result.version}" if result.published else "")
        )
        typer.echo(result.version)

    @index_app.command("calibrate")
    def calibrate(
        model: Path = typer.Option(..., "--model", help="Model bundle directory."),
        manifest: Path = typer.Option(..., "--manifest", help="Manifest with held-out knees."),
        root: Path = typer.Option(
            ..., "--root", help="Index root (its current is calibrated) or a bundle version."
        ),
        split: str = typer.Option(
            "downstream", "--split", help="Held-out split the encoders never trained on."
        ),
        coverage: float = typer.Option(
            0.9, "--coverage", min=0.5, max=0.99, help="Stated coverage of the intervals."
        ),
        k: int = typer.Option(20, "--k", min=1, help="Neighbours (as the service serves)."),
        variant: str = typer.Option("separate", "--variant", help="separate | combined"),
        publish: bool = typer.Option(
            False, "--publish", help="Point ROOT/current at the calibrated version."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    ) -> None:
        """Fit per-pixel interval calibration (split conformal, docs/UNCERTAINTY.md) on a
        held-out split and write it as a new bundle version (with --publish: served next)."""
        from mris.calibration import POOLED
        from mris.index.calibrate import calibrate_bundle
        from mris.progress import console, progress_bar

        with progress_bar(enabled=not quiet) as bar:
            task = {}

            def tick(done: int, total: int) -> None:
                if "id" not in task:
                    task["id"] = bar.add_task(f"radiographs of the {split} split", total=total)
                bar.update(task["id"], completed=done)

            path, calibration = calibrate_bundle(
                model,
                manifest,
                root,
                split=split,
                coverage=coverage,
                k=k,
                variant=variant,
                publish=publish,
                tick=tick,
            )
        lines = [
            f"[bold green]calibrated[/] {path} (coverage {coverage:g}, {split} split, "
            f"{calibration.data['knees']} knees)"
        ]
        checked = calibration.achieved.get("by_cartilage", {})
        for cartilage, groups in checked.items():
            pooled = groups.get(POOLED, {})
            lines.append(
                f"  {cartilage}: achieved {pooled.get('coverage', float('nan')):.3f} on "
                f"{calibration.achieved['held_out_knees']} held-out knees; quantile "
                f"{calibration.quantiles[cartilage][POOLED]:.2f}"
            )
        if publish:
            lines.append(f"  published: {root}/current -> {path.name}")
        console.print("\n".join(lines))
        typer.echo(path.name)

    @index_app.command("verify")
    def verify(
        path: Path = typer.Argument(
            ..., help="A bundle folder, or an index root (verifies its current)."
        ),
        model: Path | None = typer.Option(
            None, "--model", help="Also check the bundle matches these encoders."
        ),
        no_self_retrieval: bool = typer.Option(
            False, "--no-self-retrieval", help="Skip the self-retrieval search."
        ),
    ) -> None:
        """Checksums, counts, encoder match and self-retrieval; non-zero exit on any failure."""
        from mris.index.publish import resolve
        from mris.index.verify import verify_bundle
        from mris.model_bundle import load_model_bundle

        model_card = load_model_bundle(model).card if model is not None else None
        report = verify_bundle(
            resolve(path), model_card=model_card, self_retrieval=not no_self_retrieval
        )
        for line in report.checks:
            typer.echo(f"ok  {line}")
        typer.echo(f"verified {report.path}")

    @index_app.command("list")
    def list_(root: Path = typer.Argument(..., help="Index root.")) -> None:
        """Versions (oldest first), which is current, sizes and row counts."""
        from mris.constants import PREPROCESSING_VERSION
        from mris.index.bundle import read_card
        from mris.index.publish import list_versions

        versions = list_versions(root)
        if not versions:
            typer.echo(f"no index versions under {root}")
            return
        for info in versions:
            card = read_card(info.path, check_preprocessing=False)  # list old versions too
            kinds = ",".join(sorted({rc.kind for rc in card.regions.values()}))
            mark = "*" if info.current else " "
            typer.echo(
                f"{mark} {info.version}  {card.variant:<9} {card.rows:>9} rows  {kinds:<6} "
                f"{_size(info.size_bytes):>10}  {card.created}"
                + (
                    ""
                    if card.preprocessing_version == PREPROCESSING_VERSION
                    else "  (older preprocessing: rebuild)"
                )
            )

    @index_app.command("gc")
    def gc(
        root: Path = typer.Argument(..., help="Index root."),
        keep: int = typer.Option(
            ..., "--keep", min=1, help="Keep this many newest versions (current always kept)."
        ),
    ) -> None:
        """Remove old versions; never the one ``current`` points at."""
        from mris.index.publish import gc as collect
        from mris.index.publish import remove_stale_builds

        stale = remove_stale_builds(root)
        removed = collect(root, keep)
        for name in removed:
            typer.echo(f"removed {name}")
        typer.echo(f"removed {len(removed)} version(s), {len(stale)} stale build folder(s)")
