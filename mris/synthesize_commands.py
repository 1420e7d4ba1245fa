"""``mris synthesize``: one radiograph through the serving pipeline from the command line, with
the service's answers (JSON, PNG) and its DICOM results written to files."""

from __future__ import annotations

from pathlib import Path

import typer

from mris.options import DEFAULT_K, MAX_K
from mris.synthesis import DEFAULT_NAN_RULE


def register(app: typer.Typer) -> None:
    @app.command()
    def synthesize(
        dicom: Path = typer.Argument(..., exists=True, dir_okay=False, help="Radiograph (DICOM)."),
        model: Path = typer.Option(Path("mris-demo/model"), help="Model bundle."),
        index: Path = typer.Option(Path("mris-demo/index"), help="Index root (its current)."),
        variant: str = typer.Option("separate", help="separate (MRIS-S) or combined (MRIS-C)."),
        knees: str = typer.Option("both", help="both, left or right."),
        k: int = typer.Option(DEFAULT_K, min=1, max=MAX_K, help="Neighbours per knee and region."),
        keypoints: str | None = typer.Option(
            None, help='JSON {"left": [x, y], "right": [x, y]} (default: the localiser).'
        ),
        spacing_mm: float | None = typer.Option(None, help="Spacing for files without one."),
        nan_rule: str = typer.Option(DEFAULT_NAN_RULE, help="majority or all (as the service)."),
        json_out: Path | None = typer.Option(None, "--json-out", help="Write the JSON answer."),
        png_out: Path | None = typer.Option(None, "--png-out", help="Write the PNG picture."),
        dicom_out: Path | None = typer.Option(
            None,
            "--dicom-out",
            help="Folder for the Secondary Capture and the TID 1500 SR (in the source's study).",
        ),
    ) -> None:
        """Synthesize the femoral and tibial thickness maps of a radiograph's knees, print each
        knee's mean thickness, and write the answers asked for (the service's JSON and PNG, the
        DICOM results)."""
        import json

        from pydicom.filewriter import dcmwrite

        from mris.dicom_out import knee_numbers, results_to_dicom
        from mris.options import SynthesisOptions
        from mris.pipeline import Pipeline
        from mris.render import render_results_png
        from mris.service.answers import DICOM_ZIP_NAMES, synthesis_payload

        options = SynthesisOptions.parse(
            knees=knees,
            k=k,
            keypoints=keypoints,
            spacing_mm=spacing_mm,
            nan_rule=nan_rule,
        ).request_options()
        pipeline = Pipeline.load(model, index, variant)
        prepared = pipeline.prepare(dicom, options)
        hits = pipeline.search(prepared.rois, options.k)
        results = pipeline.assemble(prepared, hits, options.k, True, options.nan_rule)
        for result in results:  # the SR's numbers (mris.dicom_out.knee_numbers), printed
            numbers = knee_numbers(result)
            means = ", ".join(f"{name} {numbers[name]['mean_mm']:.3f} mm" for name in numbers)
            typer.echo(f"{result.side} knee: {means}")
        if json_out:
            payload = synthesis_payload(
                results,
                pipeline.index_version,
                pipeline.variant,
                options.k,
                options.nan_rule,
                pipeline.coverage,
            )
            json_out.write_text(json.dumps(payload), encoding="utf-8")
            typer.echo(f"JSON answer: {json_out}")
        if png_out:
            title = (
                f"{dicom.name}: synthesized from the radiograph (research use): k = {options.k}, "
                f"{pipeline.variant}, index {pipeline.index_version}"
            )
            png_out.write_bytes(
                render_results_png(results, title=title, coverage=pipeline.coverage)
            )
            typer.echo(f"picture: {png_out}")
        if dicom_out:
            dicom_out.mkdir(parents=True, exist_ok=True)
            objects = results_to_dicom(
                results,
                prepared.source,
                versions=pipeline.versions,
                k=options.k,
                coverage=pipeline.coverage,
            )
            for name, dataset in zip(DICOM_ZIP_NAMES, objects):
                dcmwrite(dicom_out / name, dataset, enforce_file_format=True)
                typer.echo(f"DICOM: {dicom_out / name}")
