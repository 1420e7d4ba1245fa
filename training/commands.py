"""CLI: ``mris train``, ``mris train-unet``, ``mris train-pix2pix`` and ``mris evaluate-localiser``.
Torch is imported inside the commands, so ``mris --help`` stays fast."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        manifest: Path = typer.Option(
            ..., help="Manifest CSV/Parquet; trains on its 'database' split."
        ),
        out: Path = typer.Option(
            ..., help="Model bundle folder to write (training state goes to OUT.training/)."
        ),
        variant: str = typer.Option(
            "separate", help="separate (MRIS-S: fc and tc pairs) | combined (MRIS-C) | both."
        ),
        profile: str = typer.Option(
            "quick",
            help="quick (demo/CI, minutes on a CPU) | reference (docs/results: 96 px, 30 epochs) "
            "| paper (the paper's exact setting).",
        ),
        epochs: int | None = typer.Option(None, min=1, help="Override the profile's epochs."),
        batch_size: int | None = typer.Option(
            None, min=2, help="Override the profile's batch size."
        ),
        device: str = typer.Option("auto", help="auto | cpu | cuda."),
        init_weights: Path | None = typer.Option(
            None,
            help="Local torchvision ResNet-18 state_dict (e.g. ImageNet) for both encoders; "
            "random init otherwise.",
        ),
        resume: bool = typer.Option(
            False, "--resume", help="Continue the run in OUT.training/ exactly where it stopped."
        ),
        force: bool = typer.Option(
            False, "--force", help="Overwrite a non-empty OUT and restart its training run."
        ),
        seed: int = typer.Option(
            0, help="Seed of every random draw (split, init, batches, augmentation)."
        ),
        threads: int | None = typer.Option(
            None, min=1, help="CPU threads for torch and onnxruntime (default: all usable cores)."
        ),
        localiser: bool = typer.Option(
            True, "--localiser/--no-localiser", help="Train the knee localiser into the bundle."
        ),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    ) -> None:
        """Train the MRIS encoders (and the knee localiser) and write a model bundle."""
        from rich.table import Table

        from mris.encoders import default_threads
        from mris.progress import EpochClock, console, progress_bar
        from mris.training.run import Reporter, TrainRequest
        from mris.training.run import train as run_train

        request = TrainRequest(
            manifest=manifest,
            out=out,
            variant=variant,
            profile=profile,
            epochs=epochs,
            batch_size=batch_size,
            device=device,
            init_weights=init_weights,
            resume=resume,
            force=force,
            seed=seed,
            threads=threads or default_threads(),
            localiser=localiser,
        )
        with progress_bar(enabled=not quiet) as bars:

            def stage(description: str, total: int):
                return bars.add_task(description, total=total)

            def advance(task, completed: int) -> None:
                bars.update(task, completed=completed)
                if completed >= bars.tasks[[t.id for t in bars.tasks].index(task)].total:
                    bars.remove_task(task)

            clock = EpochClock()

            def epoch(record: dict) -> None:
                bars.console.print(
                    f"{clock.describe(record['region'], record)}: loss {record['loss']:.3f}  "
                    + "  ".join(f"R@{k} {100 * record[f'R@{k}']:.1f}%" for k in (1, 5, 10, 20))
                )

            summary = run_train(
                request,
                Reporter(
                    log=lambda m: bars.console.print(m), stage=stage, advance=advance, epoch=epoch
                ),
            )
        table = Table(title=f"MRIS training summary ({summary['seconds']:.0f} s)")
        for column in (
            "region",
            "best epoch",
            "val R@1/5/10/20 %",
            "test R@1/5/10/20 % (first visits)",
            "chance R@20 %",
            "parity max diff",
        ):
            table.add_column(column)
        for name, region in summary["regions"].items():
            val = "/".join(f"{100 * v:.1f}" for v in region["validation"].values())
            test = region.get("test", {}).get("first_visit")
            parity = max(
                region["parity"]["max_abs_diff_radiograph"],
                region["parity"]["max_abs_diff_thickness"],
            )
            table.add_row(
                name,
                str(region["best_epoch"]),
                val,
                "/".join(f"{100 * v:.1f}" for v in test["recall"].values()) if test else "-",
                f"{100 * test['chance']['R@20']:.1f}" if test else "-",
                f"{parity:.1e}",
            )
        console.print(table)
        if "localiser" in summary:
            loc = summary["localiser"]
            console.print(
                f"localiser ({loc['split']}, {loc['images']} images): median "
                f"{loc['median_error_mm']:.2f} mm, "
                f"95th pct {loc['p95_error_mm']:.2f} mm, max {loc['max_error_mm']:.2f} mm, "
                f"both knees found {100 * loc['all_knees_found_fraction']:.1f} %"
            )
        console.print(f"model bundle: {out}")

    def baseline_command(gan: bool):
        kind, title = ("pix2pix", "pix2pix") if gan else ("unet", "U-Net")

        def command(
            manifest: Path = typer.Option(
                ..., help="Manifest CSV/Parquet; trains on its 'database' split."
            ),
            out: Path = typer.Option(
                ...,
                help=f"Folder for {kind}.onnx and {kind}-card.json (training state goes to "
                "OUT.training/).",
            ),
            profile: str = typer.Option(
                "quick",
                help="quick | reference | paper: the encoders' profiles (input size, epochs, "
                "batch, sampler, U-Net width).",
            ),
            epochs: int | None = typer.Option(None, min=1, help="Override the profile's epochs."),
            batch_size: int | None = typer.Option(
                None, min=2, help="Override the profile's batch size."
            ),
            device: str = typer.Option("auto", help="auto | cpu | cuda."),
            resume: bool = typer.Option(
                False,
                "--resume",
                help="Continue the run in OUT.training/ exactly where it stopped.",
            ),
            force: bool = typer.Option(
                False, "--force", help="Overwrite a non-empty OUT and restart its training run."
            ),
            seed: int = typer.Option(
                0, help="Seed of every random draw (split, init, batches, augmentation)."
            ),
            threads: int | None = typer.Option(
                None,
                min=1,
                help="CPU threads for torch and onnxruntime (default: all usable cores).",
            ),
            width: int | None = typer.Option(
                None,
                min=2,
                help="U-Net channels at the first level (doubling over 4 levels); default the "
                "profile's (paper 64, quick 16).",
            ),
        ) -> None:
            from mris.encoders import default_threads
            from mris.progress import EpochClock, console
            from mris.training.unet import UnetRequest, train_unet

            request = UnetRequest(
                manifest=manifest,
                out=out,
                profile=profile,
                epochs=epochs,
                batch_size=batch_size,
                device=device,
                resume=resume,
                force=force,
                seed=seed,
                threads=threads or default_threads(),
                width=width,
                gan=gan,
            )

            clock = EpochClock()

            def epoch(record: dict) -> None:
                gan_losses = (
                    f" (adversarial {record['loss_gan']:.3f}, D {record['loss_d']:.3f})"
                    if gan
                    else ""
                )
                console.print(
                    f"{clock.describe(kind, record)}: L1 {record['loss_mm']:.3f} "
                    f"mm{gan_losses}  validation MAE "
                    f"{record['val_mae_mm']:.3f} mm (fc {record['val_mae_fc_mm']:.3f}, tc "
                    f"{record['val_mae_tc_mm']:.3f})"
                )

            metrics = train_unet(request, log=console.print, on_epoch=epoch)
            console.print(
                f"{title}: best epoch {metrics['best_epoch']}, validation MAE "
                f"{metrics['validation']['val_mae_mm']:.3f} mm; {out / (kind + '.onnx')} "
                f"({metrics['seconds']:.0f} s)"
            )

        command.__doc__ = (
            "Train the pix2pix baseline (the U-Net generator with a PatchGAN discriminator; "
            "ROI -> fc and tc maps in mm) and export pix2pix.onnx."
            if gan
            else "Train the direct-synthesis U-Net baseline (radiograph ROI -> fc and tc maps in "
            "mm) and export unet.onnx."
        )
        return command

    app.command("train-unet")(baseline_command(gan=False))
    app.command("train-pix2pix")(baseline_command(gan=True))

    @app.command("evaluate-localiser")
    def evaluate_localiser_command(
        model: Path = typer.Option(..., help="Model bundle folder (with a localiser)."),
        manifest: Path = typer.Option(..., help="Manifest with keypoints (true joint centres)."),
        split: str = typer.Option("test", help="Split to measure on."),
        threads: int | None = typer.Option(None, min=1, help="onnxruntime threads."),
        json_out: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    ) -> None:
        """Print the knee localiser's error (mm) against the manifest's keypoints on a split."""
        import json

        from mris.localiser import KneeLocaliser, evaluate_localiser
        from mris.manifest import read_manifest
        from mris.progress import console

        localiser = KneeLocaliser.from_bundle(model, threads=threads)
        figures = evaluate_localiser(localiser, read_manifest(manifest), split)
        if json_out:
            typer.echo(json.dumps(figures, indent=2))
            return
        console.print(
            f"{figures['images']} images, {figures['knees']} knees on '{split}': median error "
            f"{figures['median_error_mm']:.2f} mm, 95th pct {figures['p95_error_mm']:.2f} mm, max "
            f"{figures['max_error_mm']:.2f} mm; both knees found on "
            f"{100 * figures['all_knees_found_fraction']:.1f} % of images"
        )
