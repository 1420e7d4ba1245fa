"""Pictures of synthesis results: per knee the ROI as the encoder saw it, the fc and tc maps with
a colour bar in mm, and their uncertainty (weighted standard deviation), with the calibrated
interval's lower and upper bound maps when the index bundle has a calibration
(``mris.calibration``). Used by the service's ``format=png``, the DICOM Secondary Capture
(``mris.dicom_out``), ``mris synthesize --png-out`` and ``mris demo``. Thread-safe: builds
``Figure`` objects, never pyplot."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mris.constants import CARTILAGES

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from mris.pipeline import KneeResult

# One thickness scale for every picture the project makes (this module's figures, the Secondary
# Capture, the viewer through /viewer/config): 0-6 mm covers the cohorts' maps (their largest
# values are about 6.1 mm); a larger value is drawn in the top colour and the colour bar ends in
# a triangle (``extend="max"``) saying so. The interval bounds are thicknesses: same scale.
THICKNESS_MAX_MM = 6.0
STD_MAX_MM = 1.0
THICKNESS_CMAP = "viridis"  # perceptually uniform
UNCERTAINTY_CMAP = "magma"
RAW_SD_NOTICE = "uncertainty: raw neighbours' SD (index not calibrated)"
PANEL_IN = 2.6  # one panel's side in inches

# (title, image, colour map, vmin, vmax, unit): one picture of a row.
Panel = tuple[str, np.ndarray, str, float, float, str | None]


def render_results_png(
    results: Sequence[KneeResult],
    truth_mm: Sequence[dict[str, np.ndarray]] | None = None,
    dpi: int = 90,
    title: str | None = None,
    coverage: float | None = None,
) -> bytes:
    """``results_figure`` as PNG bytes, under ``title`` (what the picture shows: which
    radiograph, which k...). ``coverage``: the stated coverage of the results' calibrated
    intervals (``Pipeline.coverage``; None when the index has no calibration)."""
    figure = results_figure(results, truth_mm, dpi, title, coverage)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def interval_label(coverage: float | None) -> str:
    """``90 % interval`` for coverage 0.9; ``calibrated interval`` when it is not known."""
    return f"{coverage * 100:g} % interval" if coverage is not None else "calibrated interval"


def results_figure(
    results: Sequence[KneeResult],
    truth_mm: Sequence[dict[str, np.ndarray]] | None = None,
    dpi: int = 90,
    title: str | None = None,
    coverage: float | None = None,
) -> Figure:
    """The figure ``render_results_png`` saves (an Agg canvas attached), for a caller that adds
    to it or rasterises it itself (``mris.dicom_out``'s Secondary Capture; it replaces the
    title, never the bottom line).

    Without intervals (the index bundle has no calibration): one row per knee, ROI | fc | tc |
    fc SD | tc SD (| true fc | true tc when ``truth_mm``), and a bottom line saying that the
    uncertainty is the raw neighbours' SD. With intervals (``KneeResult.lower_mm``): per knee
    one row per cartilage, its synthesized map | SD | interval lower | interval upper (| true),
    the first column holding the ROI in the first row and the knee's interval (coverage, group,
    reliability: the mean interval width in mm) in words in the second; the bottom line says
    what the interval promises. Each row names its knee and says when the pictures are mirrored
    (a RIGHT knee's ROI and maps are flipped into the atlas orientation); each map is marked
    medial / lateral along its columns."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    calibrated = any(result.lower_mm for result in results)
    if calibrated:
        columns = 5 + (1 if truth_mm else 0)
        rows_per_knee = len(CARTILAGES)
    else:
        columns = 5 + (2 if truth_mm else 0)
        rows_per_knee = 1
    rows = max(1, len(results)) * rows_per_knee
    figure = Figure(figsize=(PANEL_IN * columns, PANEL_IN * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    if title:
        figure.suptitle(title, fontsize=9)
    axes = np.atleast_2d(figure.subplots(rows, columns))
    for number, result in enumerate(results):
        truth = truth_mm[number] if truth_mm else None
        if calibrated:
            for offset, name in enumerate(CARTILAGES):
                first = _interval_text(result, coverage) if offset else _roi_panel(result)
                panels = [first, *_cartilage_panels(result, name, truth, coverage)]
                _draw_row(figure, axes[number * rows_per_knee + offset], result, panels)
        else:
            _draw_row(figure, axes[number], result, _knee_panels(result, truth))
    if calibrated:
        figure.supxlabel(
            f"uncertainty: calibrated {interval_label(coverage)}s (split conformal): a cartilage "
            "pixel's true thickness lies between the lower and upper maps"
            + (f" with probability {coverage:g}" if coverage is not None else "")
            + ", for knees like the calibration knees",
            fontsize=8,
        )
    else:
        figure.supxlabel(RAW_SD_NOTICE, fontsize=8)
    return figure


def _roi_panel(result: KneeResult) -> Panel:
    return ("ROI (encoder input)", result.roi.image, "gray", 0.0, 1.0, None)


def _thickness(title: str, image: np.ndarray) -> Panel:
    return (title, image, THICKNESS_CMAP, 0.0, THICKNESS_MAX_MM, "mm")


def _sd(title: str, image: np.ndarray) -> Panel:
    return (title, image, UNCERTAINTY_CMAP, 0.0, STD_MAX_MM, "mm")


def _knee_panels(result: KneeResult, truth: dict[str, np.ndarray] | None) -> list[Panel]:
    """One row for a knee without intervals: ROI, the maps, their SDs (, the true maps)."""
    panels = [_roi_panel(result)]
    names = [name for name in CARTILAGES if name in result.maps_mm]
    panels += [_thickness(f"{n.upper()} synthesized", result.maps_mm[n]) for n in names]
    panels += [_sd(f"{n.upper()} uncertainty (SD)", result.std_mm[n]) for n in names]
    if truth:
        panels += [_thickness(f"{n.upper()} true (MR)", truth[n]) for n in CARTILAGES if n in truth]
    return panels


def _cartilage_panels(
    result: KneeResult,
    name: str,
    truth: dict[str, np.ndarray] | None,
    coverage: float | None,
) -> list[Panel | None]:
    """One cartilage's row with intervals: map, SD, lower, upper (, true); None: left empty."""
    label = name.upper()
    interval = interval_label(coverage)
    panels: list[Panel | None] = [
        _thickness(f"{label} synthesized", result.maps_mm[name])
        if name in result.maps_mm
        else None,
        _sd(f"{label} uncertainty (SD)", result.std_mm[name]) if name in result.std_mm else None,
        _thickness(f"{label} {interval}, lower", result.lower_mm[name])
        if name in result.lower_mm
        else None,
        _thickness(f"{label} {interval}, upper", result.upper_mm[name])
        if name in result.upper_mm
        else None,
    ]
    if truth is not None:
        panels.append(_thickness(f"{label} true (MR)", truth[name]) if name in truth else None)
    return panels


def _interval_text(result: KneeResult, coverage: float | None) -> str:
    """The knee's interval in words, for the first column's free cell."""
    if not result.lower_mm:
        return f"{result.side} knee\n\nno interval:\nraw neighbours' SD"
    group = result.calibration_group
    lines = [f"{result.side} knee", "", interval_label(coverage)]
    if group:
        lines += [f"calibration group {group}", "(neighbours' KL grade)"]
    lines += ["", "reliability: mean", f"interval width {result.reliability_mm:.2f} mm"]
    return "\n".join(lines)


def _draw_row(
    figure: Figure, axes: Sequence[Axes], result: KneeResult, panels: Sequence[Panel | str | None]
) -> None:
    """One row of axes: a panel per column (a map with its colour bar, or words), the rest
    hidden."""
    mirrored = " (mirrored)" if result.side == "RIGHT" else ""
    for column, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        panel = panels[column] if column < len(panels) else None
        if panel is None:
            ax.set_visible(False)
            continue
        if isinstance(panel, str):  # words, top left of an empty cell
            ax.axis("off")
            ax.text(0.0, 1.0, panel, fontsize=8, va="top", ha="left", transform=ax.transAxes)
            continue
        title, image, cmap, vmin, vmax, unit = panel
        shown = np.ma.masked_invalid(np.asarray(image, dtype=np.float32))
        handle = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
        label = f"{result.side} knee{mirrored}\n{title}" if column == 0 else title
        ax.set_title(label, fontsize=8)
        if column > 0:  # an atlas-space map: columns run medial -> lateral for both knees
            ax.set_xlabel("medial \u2190   \u2192 lateral", fontsize=7)
        if unit:
            bar = figure.colorbar(handle, ax=ax, fraction=0.046, pad=0.02, extend="max")
            bar.set_label(unit, fontsize=7)
            bar.ax.tick_params(labelsize=6)
