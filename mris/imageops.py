"""Image operations shared by every preprocessing path: one resize, used everywhere.

``resize`` is Pillow's mode-'F' (float32) resampling with the BILINEAR filter. Pillow scales the
filter's support with the reduction factor, so shrinking is anti-aliased (a triangle filter as
wide as the reduction: an area-weighted average), and enlarging is plain bilinear. The filter is
non-negative, so the output stays inside the input's range (no ringing: a thickness map of 0 mm
outside cartilage never turns negative). Training, index building and serving all call this one
function, so the encoder sees identically resampled inputs everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

_FILTER = Image.Resampling.BILINEAR


def resize(
    image: np.ndarray,
    shape: Sequence[int],
    box: Sequence[float] | None = None,
) -> np.ndarray:
    """Resize a 2-D image to ``shape`` = (rows, cols), anti-aliased; returns float32.

    ``box`` (optional, keyword use recommended) = (x0, y0, x1, y1) in pixel-edge coordinates of
    ``image`` (pixel (col, row) spans [col, col+1] x [row, row+1]): resample only that
    sub-rectangle, with sub-pixel precision, to ``shape``. Pixels just outside the box still feed
    the filter where they exist.
    """
    array = np.asarray(image)
    if array.ndim != 2:
        raise ValueError(f"resize expects a 2-D image, got shape {array.shape}")
    rows, cols = (int(shape[0]), int(shape[1]))
    if rows < 1 or cols < 1:
        raise ValueError(f"resize target must be at least 1 x 1, got {rows} x {cols}")
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    if box is None and array.shape == (rows, cols):
        return array.copy()
    pil = Image.fromarray(np.ascontiguousarray(array))
    pil_box = None if box is None else tuple(float(v) for v in box)
    resized = pil.resize((cols, rows), resample=_FILTER, box=pil_box)
    return np.array(resized, dtype=np.float32)
