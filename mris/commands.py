"""Top-level commands that span concerns: ``mris demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        workdir: Path = typer.Option(
            Path("mris-demo"), help="Folder for the cohort, model and index."
        ),
        subjects: int = typer.Option(300, min=20, help="Subjects in the demo cohort."),
        seed: int = typer.Option(7, help="Cohort seed."),
        prepare_only: bool = typer.Option(
            False, "--prepare-only", help="Stop after the index is published."
        ),
        serve: bool = typer.Option(False, "--serve", help="Then serve the API on the demo bundle."),
        port: int = typer.Option(8000, help="Port for --serve (listens on 127.0.0.1)."),
        epochs: int = typer.Option(
            0, min=0, help="Override the quick profile's epochs (0: the profile's)."
        ),
        evaluate: bool = typer.Option(
            False,
            "--evaluate",
            help="Then run mris evaluate (the paper's three tables) into WORKDIR/evaluation.",
        ),
    ) -> None:
        """The main job on the synthetic cohort: cohort, quick training, index build and publish,
        then a synthesis of held-out test radiographs through the service's pipeline.

        A second run reuses what is already done.
        """
        from mris.demo import run_demo

        run_demo(
            workdir=workdir,
            subjects=subjects,
            seed=seed,
            prepare_only=prepare_only,
            serve=serve,
            port=port,
            epochs=epochs or None,
            evaluate=evaluate,
        )
