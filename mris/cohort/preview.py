"""preview.png: a few baseline radiographs with the true 140 mm ROI boxes, beside their maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mris.constants import CARTILAGES
from mris.manifest import ManifestRow

ROI_MM = 140.0


def _read_display(path: Path) -> tuple[np.ndarray, float]:
    """Pixels with bone bright and the spacing (pydicom directly: no dependency on mris.dicom)."""
    import pydicom

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() - pixels
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    return pixels, float(spacing[0])


def write_preview(out: Path, rows: list[ManifestRow], n_visits: int = 3) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from mris.render import THICKNESS_CMAP, THICKNESS_MAX_MM

    by_image: dict[str, list[ManifestRow]] = {}
    for row in rows:
        if row.visit_month == 0:
            by_image.setdefault(row.radiograph_path, []).append(row)
    chosen = list(by_image.items())[:n_visits]
    fig, axes = plt.subplots(
        max(len(chosen), 1),
        5,
        figsize=(13, 2.7 * max(len(chosen), 1) + 0.5),
        gridspec_kw={"width_ratios": [1.25, 1, 1, 1, 1]},
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(
        "Synthetic cohort: baseline radiographs with the true 140 mm knee ROIs (+ joint centre) "
        "and the knees' true thickness maps\n(atlas space, medial on the left; RIGHT knees "
        "mirrored into it)",
        fontsize=10,
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    for line, (image_path, knees) in enumerate(chosen):
        pixels, spacing = _read_display(out / image_path)
        ax = axes[line, 0]
        low, high = np.percentile(pixels, [1, 99.5])
        ax.imshow(pixels, cmap="gray", vmin=low, vmax=high)
        half = ROI_MM / spacing / 2
        for row in knees:
            ax.add_patch(
                Rectangle(
                    (row.keypoint_x - half, row.keypoint_y - half),
                    2 * half,
                    2 * half,
                    fill=False,
                    edgecolor="orange" if row.side == "RIGHT" else "cyan",
                    lw=1.2,
                )
            )
            ax.plot(row.keypoint_x, row.keypoint_y, "+", color="red", ms=6)
        ax.set_title(f"{knees[0].subject_id} month 0 (patient RIGHT on image left)", fontsize=8)
        knees = sorted(knees, key=lambda r: r.side != "RIGHT")
        for k, row in enumerate(knees):
            for j, region in enumerate(CARTILAGES):
                thickness = np.load(out / getattr(row, f"{region}_path"))
                axm = axes[line, 1 + 2 * k + j]
                im = axm.imshow(thickness, cmap=THICKNESS_CMAP, vmin=0, vmax=THICKNESS_MAX_MM)
                axm.set_title(f"{row.side} {region.upper()}, KL {row.klg}", fontsize=8)
                axm.set_xlabel("medial \u2190   \u2192 lateral", fontsize=7)
    fig.colorbar(
        im, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="thickness (mm)", extend="max"
    ) if chosen else None
    path = out / "preview.png"
    tmp = out / ".tmp-preview.png"
    fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path
