"""Pictures of synthesis results: per knee the ROI as the encoder saw it, the fc and tc maps with
a colour bar in mm, and their uncertainty (weighted standard deviation). Used by the service's
``format=png`` and by ``mris demo``. Thread-safe: builds ``Figure`` objects, never pyplot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mris.constants import CARTILAGES

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from mris.pipeline import KneeResult

# One thickness scale for every picture the project makes (this module's figures, the Secondary
# Capture, the viewer through /viewer/config): 0-6 mm covers the cohorts' maps (their largest
# values are about 6.1 mm); a larger value is drawn in the top colour and the colour bar ends in
# a triangle (``extend="max"``) saying so.
THICKNESS_MAX_MM = 6.0
STD_MAX_MM = 1.0
THICKNESS_CMAP = "viridis"  # perceptually uniform
UNCERTAINTY_CMAP = "magma"


def render_results_png(
    results: Sequence[KneeResult],
    truth_mm: Sequence[dict[str, np.ndarray]] | None = None,
    dpi: int = 90,
    title: str | None = None,
) -> bytes:
    """One row per knee: ROI | fc | tc | fc std | tc std (| true fc | true tc when ``truth_mm``),
    under ``title`` (what the picture shows: which radiograph, which k...)."""
    figure = results_figure(results, truth_mm, dpi, title)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def results_figure(
    results: Sequence[KneeResult],
    truth_mm: Sequence[dict[str, np.ndarray]] | None = None,
    dpi: int = 90,
    title: str | None = None,
) -> Figure:
    """The figure ``render_results_png`` saves (an Agg canvas attached), for a caller that adds
    to it or rasterises it itself (``mris.dicom_out``'s Secondary Capture). Each row names its
    knee and says when the pictures are mirrored (a RIGHT knee's ROI and maps are flipped into
    the atlas orientation); each map is marked medial / lateral along its columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = 5 + (2 if truth_mm else 0)
    rows = max(1, len(results))
    figure = Figure(figsize=(2.6 * columns, 2.6 * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title, fontsize=9)
    axes = np.atleast_2d(figure.subplots(rows, columns))
    for row, result in enumerate(results):
        panels = [("ROI (encoder input)", result.roi.image, "gray", 0.0, 1.0, None)]
        for name in CARTILAGES:
            if name in result.maps_mm:
                panels.append(
                    (
                        f"{name.upper()} synthesized",
                        result.maps_mm[name],
                        THICKNESS_CMAP,
                        0.0,
                        THICKNESS_MAX_MM,
                        "mm",
                    )
                )
        for name in CARTILAGES:
            if name in result.std_mm:
                panels.append(
                    (
                        f"{name.upper()} uncertainty (SD)",
                        result.std_mm[name],
                        UNCERTAINTY_CMAP,
                        0.0,
                        STD_MAX_MM,
                        "mm",
                    )
                )
        if truth_mm:
            for name in CARTILAGES:
                if name in truth_mm[row]:
                    panels.append(
                        (
                            f"{name.upper()} true (MR)",
                            truth_mm[row][name],
                            THICKNESS_CMAP,
                            0.0,
                            THICKNESS_MAX_MM,
                            "mm",
                        )
                    )
        for column in range(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            if column >= len(panels):
                ax.set_visible(False)
                continue
            title, image, cmap, vmin, vmax, unit = panels[column]
            shown = np.ma.masked_invalid(np.asarray(image, dtype=np.float32))
            handle = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            mirrored = " (mirrored)" if result.side == "RIGHT" else ""
            label = f"{result.side} knee{mirrored}\n{title}" if column == 0 else title
            ax.set_title(label, fontsize=8)
            if column > 0:  # an atlas-space map: columns run medial -> lateral for both knees
                ax.set_xlabel("medial \u2190   \u2192 lateral", fontsize=7)
            if unit:
                bar = figure.colorbar(handle, ax=ax, fraction=0.046, pad=0.02, extend="max")
                bar.set_label(unit, fontsize=7)
                bar.ax.tick_params(labelsize=6)
    return figure
