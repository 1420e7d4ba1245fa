"""Ingest commands: ``mris import-oai`` (public MRIS/OAI layout -> manifest) and ``mris roi``
(check the preprocessing of one radiograph)."""

# ruff: noqa: B008 - typer declares options as argument defaults

from __future__ import annotations

from pathlib import Path

import typer

from mris.errors import BadParameter
from mris.roi import parse_keypoints as parse_centres

# No square brackets in messages: the CLI prints them through rich, which reads [...] as markup.
_KEYPOINT_FORM = (
    'an object with "right" and/or "left", each a list of two numbers: the pixel column and row '
    "of that knee's joint centre (the patient's right knee is on the image's left)"
)


def parse_keypoints(text: str) -> dict[str, tuple[float, float]]:
    """``{"left": [x, y], "right": [x, y]}`` (inline JSON or a .json file) -> {SIDE: (col, row)}.

    ``right`` is the patient's right knee, on the image's left. Either key may be omitted.
    """
    source = text
    candidate = Path(text)
    if not text.lstrip().startswith("{") and candidate.is_file():
        source = candidate.read_text(encoding="utf-8")
    centres = parse_centres(source)
    # Image order: the patient's right knee (smaller column) first.
    return dict(sorted(centres.items(), key=lambda item: item[1][0]))


def render_roi_figure(radiograph, rois, out: Path) -> Path:
    """PNG: the radiograph with the ROI boxes, and each crop as the encoder sees it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mris.fsutil import atomic_write
    from mris.imageops import resize

    rows, cols = radiograph.shape
    step = max(1, int(max(rows, cols) // 1024))  # display copy, at most ~1024 px wide
    preview = resize(radiograph.pixels, (max(1, rows // step), max(1, cols // step)))
    low, high = (float(v) for v in (preview.min(), preview.max()))
    figure, axes = plt.subplots(
        1,
        1 + len(rois),
        figsize=(5 + 3 * len(rois), 4.2),
        gridspec_kw={"width_ratios": [cols / rows * 1.2] + [1] * len(rois)},
    )
    axes = list(axes) if len(rois) else [axes]
    axes[0].imshow(preview, cmap="gray", vmin=low, vmax=high, extent=(0, cols, rows, 0))
    axes[0].set_title(
        f"{cols} x {rows} px, {radiograph.spacing_mm:.3f} mm/px ({radiograph.spacing_source})",
        fontsize=8,
    )
    for roi in rois:
        x0, y0, x1, y1 = roi.box_xyxy
        colour = "tab:orange" if roi.side == "RIGHT" else "tab:cyan"
        axes[0].add_patch(
            Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5)
        )
        axes[0].plot([roi.centre_xy[0] + 0.5], [roi.centre_xy[1] + 0.5], "+", color=colour)
        axes[0].text(x0, y0, f" {roi.side}", color=colour, va="bottom", fontsize=8)
    axes[0].set_axis_off()
    for axis, roi in zip(axes[1:], rois):
        axis.imshow(roi.image, cmap="gray", vmin=0.0, vmax=1.0)
        flipped = " (flipped)" if roi.side == "RIGHT" else ""
        axis.set_title(
            f"{roi.side} knee{flipped}\n{roi.image.shape[1]} px, p99 -> 0.99", fontsize=8
        )
        axis.set_axis_off()
    figure.tight_layout()
    try:
        atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(figure)
    return out


def register(app: typer.Typer) -> None:
    @app.command("import-oai")
    def import_oai_command(
        sheets: Path = typer.Option(
            ..., "--sheets", help="Folder holding **/mri_xray.csv and **/xray_keypoints.csv."
        ),
        xray_root: Path = typer.Option(
            ..., "--xray-root", help="Root of the OAI X-ray folders (each holds a DICOM '001')."
        ),
        thickness_root: Path = typer.Option(
            ...,
            "--thickness-root",
            help="Root of <patient>/MR_SAG_3D_DESS/<SIDE>_KNEE/<visit>/avsm/*.npy.",
        ),
        klg: Path | None = typer.Option(
            None, "--klg", help="KLG sheet (ID, SIDE, READPRJ, V00XRKL, ...)."
        ),
        downstream_folds: list[str] = typer.Option(
            [],
            "--downstream-folds",
            help="train_set folds that become the 'downstream' split (fold3 or 3; repeat or "
            "comma-separate).",
        ),
        out: Path = typer.Option(..., "--out", help="Manifest CSV to write."),
    ) -> None:
        """Import the public MRIS/OAI layout into a manifest (one row per knee-visit)."""
        from mris.oai_import import import_oai, write_oai_manifest

        summary = import_oai(sheets, xray_root, thickness_root, klg, downstream_folds)
        write_oai_manifest(summary, out)
        for line in summary.lines():
            typer.echo(line)
        typer.echo(f"manifest: {out}")

    @app.command("roi")
    def roi_command(
        dicom: Path = typer.Argument(..., help="A radiograph DICOM file."),
        keypoints: str | None = typer.Option(
            None,
            "--keypoints",
            help='Joint centres as inline JSON or a .json file: an object with "right" and/or '
            '"left", each a list of two numbers (pixel column, row); "right" is the '
            "patient's right knee, on the image's left.",
        ),
        spacing_mm: float | None = typer.Option(
            None, "--spacing-mm", help="mm per pixel; overrides the file's spacing tags."
        ),
        encoder_px: int | None = typer.Option(
            None, "--encoder-px", min=16, help="Encoder input size (default: PreprocessConfig)."
        ),
        out: Path = typer.Option(Path("roi.png"), "--out", help="PNG to write."),
        model: Path | None = typer.Option(
            None,
            "--model",
            help="Model bundle: its preprocessing constants, and its knee localiser when no "
            "--keypoints are given.",
        ),
    ) -> None:
        """Show the knee ROIs of one radiograph as the encoder sees them (a PNG)."""
        from dataclasses import replace

        from mris.constants import PreprocessConfig
        from mris.dicom import read_radiograph
        from mris.options import SynthesisOptions
        from mris.roi import extract_rois

        SynthesisOptions.parse(spacing_mm=spacing_mm)  # the service's limits, in its words
        if keypoints is None and model is None:
            raise BadParameter(
                f"give --keypoints ({_KEYPOINT_FORM}) or --model with a knee localiser"
            )
        bundle = None
        config = PreprocessConfig()
        if model is not None:
            from mris.model_bundle import load_model_bundle

            bundle = load_model_bundle(model)
            config = bundle.card.preprocess_config
        if encoder_px is not None:
            config = replace(config, encoder_px=encoder_px)
        radiograph = read_radiograph(dicom, spacing_mm=spacing_mm)
        if keypoints is not None:
            centres = parse_keypoints(keypoints)
        else:
            from mris.localiser import locate_knees

            found = locate_knees(radiograph, bundle)  # KneeNotFound when no knee is found
            centres = {
                side: centre
                for side, (centre, _) in sorted(found.items(), key=lambda i: i[1][0][0])
            }
        rois = extract_rois(radiograph, centres, config)
        render_roi_figure(radiograph, rois, out)
        for roi in rois:
            typer.echo(
                f"{roi.side}: centre ({roi.centre_xy[0]:g}, {roi.centre_xy[1]:g}) px, "
                f"ROI {roi.size_px:.1f} px = {config.roi_size_mm:g} mm at {roi.spacing_mm:g} mm/px "
                f"({radiograph.spacing_source})"
            )
        typer.echo(f"wrote {out}")
