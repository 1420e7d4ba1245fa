"""Top-level commands that span concerns: ``mris demo``."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        workdir: Path = typer.Option(Path("mris-demo"), help="Folder for the cohort, model and index."),
        subjects: int = typer.Option(300, min=20, help="Subjects in the demo cohort."),
        seed: int = typer.Option(7, help="Cohort seed."),
    ) -> None:
        """Run the main job on the synthetic cohort: make the cohort (later: train, index, synthesize).

        A second run reuses what is already done.
        """
        from mris.demo import run_demo

        run_demo(workdir=workdir, subjects=subjects, seed=seed)
