"""Knee ROI: ``Radiograph`` + joint centre -> the encoder's radiograph input.

Decisions (docs/PREPROCESSING.md):

- The ROI is a ``roi_size_mm`` square (140 mm) centred on the joint centre (col, row) in pixel
  coordinates, pixel centres at integer positions: pixel (c, r) spans [c, c+1] x [r, r+1] in the
  edge coordinates used for the crop, so the box is ``centre + 0.5 -/+ size_px / 2``. The crop is
  resampled with sub-pixel precision by ``mris.imageops.resize`` (anti-aliased).
- Where the box leaves the image it is padded with the radiograph's minimum (the darkest value:
  direct exposure, "nothing there"), never with reflected anatomy.
- Intensity (``PREPROCESSING_VERSION`` 2), the reference's ``preprocess.normalize(img,
  percentage_clip=99)`` on the resampled ROI: ``(roi - m) / p * intensity_target`` where ``m``
  is the minimum of the ROI's in-image pixels and ``p`` the ``intensity_percentile`` (99th)
  percentile of the shifted in-image pixels (``roi - m``): the smallest 99 % of values map to
  [0, 0.99]. The statistics exclude the border padding, so a knee near the border is scaled
  like one in the middle, and pixels outside the in-image rectangle (padding, and the edge
  pixels that blend padding in) are raised to at least ``m`` before the shift, so padding maps
  to exactly 0 (never negative; "nothing there" is the darkest value the encoder sees). With no
  padding this is the reference's formula exactly. A ROI whose shifted percentile is not
  positive (blank: 99 % of it one value) raises ``KneeNotFound``.
- RIGHT knees are flipped left-right after resampling (``flip_right``).
- A centre outside the image (or not finite) raises ``KneeNotFound``.
- ``parse_keypoints`` takes caller text (CLI, form field, query parameter) and gives centres or
  ``BadParameter``, nothing else: at most ``KEYPOINTS_MAX_CHARS`` characters (so no deep nesting
  reaches ``json.loads``), no NaN/Infinity, each coordinate a finite number within
  ±``KEYPOINT_MAX_ABS_PX`` (ints past the float range included); whether the centre lies in the
  image is checked when the image is known.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mris.constants import SIDES, PreprocessConfig
from mris.dicom import Radiograph
from mris.errors import BadParameter, KneeNotFound
from mris.imageops import resize


@dataclass(frozen=True)
class KneeRoi:
    """One knee's encoder input and where it came from.

    - ``image``: float32 (encoder_px, encoder_px), flipped for RIGHT, percentile -> target.
    - ``centre_xy``: joint centre (col, row) in source pixels; ``size_px``: ROI side in source
      pixels (``roi_size_mm / spacing_mm``); ``spacing_mm``: mm per source pixel.
    - ``side``: LEFT | RIGHT (the patient's); ``source``: where the centre came from
      (``caller``, ``manifest``, ``localiser``...).
    - ``scale`` / ``offset``: the intensity mapping, ``image = (roi - offset) * scale``
      (``offset`` the in-image minimum, ``scale`` = target / percentile of the shifted ROI).
    """

    image: np.ndarray
    centre_xy: tuple[float, float]
    size_px: float
    spacing_mm: float
    side: str
    source: str
    scale: float = 1.0
    offset: float = 0.0

    @property
    def box_xyxy(self) -> tuple[float, float, float, float]:
        """The ROI in pixel-edge coordinates of the radiograph: (x0, y0, x1, y1)."""
        half = self.size_px / 2
        cx, cy = self.centre_xy[0] + 0.5, self.centre_xy[1] + 0.5
        return (cx - half, cy - half, cx + half, cy + half)


def _check_side(side: str) -> str:
    name = str(side).strip().upper()
    if name not in SIDES:
        raise BadParameter(f"side must be LEFT or RIGHT, got {side!r}")
    return name


def _check_centre(
    radiograph: Radiograph, side: str, centre_xy: Sequence[float]
) -> tuple[float, float]:
    try:
        col, row = (float(centre_xy[0]), float(centre_xy[1]))
    except (TypeError, ValueError, IndexError) as exc:
        raise BadParameter(f"the {side} knee centre must be two numbers (column, row)") from exc
    rows, cols = radiograph.shape
    if not (math.isfinite(col) and math.isfinite(row)) or not (0 <= col < cols and 0 <= row < rows):
        raise KneeNotFound(
            f"the {side} knee centre ({col:g}, {row:g}) lies outside the {cols} x {rows} image"
        )
    return col, row


def _crop_resample(
    pixels: np.ndarray, box: tuple[float, float, float, float], out_px: int, pad_value: float
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resample ``box`` (edge coordinates) of ``pixels`` to out_px x out_px, padding outside.

    Returns the image and the output-pixel rectangle (r0, r1, c0, c1) that lies fully inside the
    source image (for the intensity percentile).
    """
    rows, cols = pixels.shape
    x0, y0, x1, y1 = box
    source_px_per_output_px = (x1 - x0) / out_px
    margin = math.ceil(source_px_per_output_px) + 2  # the anti-aliasing filter reaches this far out
    ix0, iy0 = math.floor(x0) - margin, math.floor(y0) - margin
    ix1, iy1 = math.ceil(x1) + margin, math.ceil(y1) + margin
    inside = ix0 >= 0 and iy0 >= 0 and ix1 <= cols and iy1 <= rows
    if inside:
        canvas = pixels[iy0:iy1, ix0:ix1]
    else:
        canvas = np.full((iy1 - iy0, ix1 - ix0), pad_value, dtype=np.float32)
        sx0, sy0, sx1, sy1 = max(ix0, 0), max(iy0, 0), min(ix1, cols), min(iy1, rows)
        if sx1 > sx0 and sy1 > sy0:
            canvas[sy0 - iy0 : sy1 - iy0, sx0 - ix0 : sx1 - ix0] = pixels[sy0:sy1, sx0:sx1]
    image = resize(canvas, (out_px, out_px), box=(x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0))
    # Output pixels whose footprint lies wholly inside the image.
    c0 = min(out_px, max(0, math.ceil((0 - x0) / source_px_per_output_px)))
    c1 = max(0, min(out_px, math.floor((cols - x0) / source_px_per_output_px)))
    r0 = min(out_px, max(0, math.ceil((0 - y0) / source_px_per_output_px)))
    r1 = max(0, min(out_px, math.floor((rows - y0) / source_px_per_output_px)))
    return image, (r0, r1, c0, c1)


def normalise_intensity(
    image: np.ndarray, valid: tuple[int, int, int, int], config: PreprocessConfig, side: str
) -> tuple[np.ndarray, float, float]:
    """The reference's ``normalize(img, percentage_clip=99)``, in place on float32 ``image``:
    ``(image - m) / p * target`` with ``m`` the minimum and ``p`` the percentile of
    ``image - m``, both over the in-image rectangle ``valid`` = (r0, r1, c0, c1) (the whole image
    when empty); pixels outside it (border padding, and the edge pixels partly padded) are
    raised to at least ``m`` first, so padding becomes exactly 0 and nothing is negative.
    Returns (image, scale, offset=m); ``KneeNotFound`` when ``p`` is not positive."""
    r0, r1, c0, c1 = valid
    inside = r1 > r0 and c1 > c0
    region = image[r0:r1, c0:c1] if inside else image
    offset = float(region.min())
    level = float(np.percentile(region - np.float32(offset), config.intensity_percentile))
    if not math.isfinite(level) or level <= 0:
        raise KneeNotFound(
            f"the {side} knee ROI is blank: the {config.intensity_percentile:g}th percentile of "
            f"its intensities above their minimum is {level:g}, so it cannot be normalised"
        )
    if inside and (r0, r1, c0, c1) != (0, image.shape[0], 0, image.shape[1]):
        pad = np.ones(image.shape, dtype=bool)
        pad[r0:r1, c0:c1] = False
        image[pad] = np.maximum(image[pad], np.float32(offset))
    scale = config.intensity_target / level
    image -= np.float32(offset)
    image *= np.float32(scale)
    return image, scale, offset


def _extract(
    radiograph: Radiograph,
    side: str,
    centre_xy: Sequence[float],
    config: PreprocessConfig,
    source: str,
    pad_value: float,
) -> KneeRoi:
    side = _check_side(side)
    col, row = _check_centre(radiograph, side, centre_xy)
    size_px = config.roi_size_mm / radiograph.spacing_mm
    half = size_px / 2
    box = (col + 0.5 - half, row + 0.5 - half, col + 0.5 + half, row + 0.5 + half)
    image, valid = _crop_resample(radiograph.pixels, box, config.encoder_px, pad_value)
    image, scale, offset = normalise_intensity(image, valid, config, side)
    if side == "RIGHT" and config.flip_right:
        image = np.ascontiguousarray(image[:, ::-1])
    return KneeRoi(
        image=image,
        centre_xy=(col, row),
        size_px=size_px,
        spacing_mm=radiograph.spacing_mm,
        side=side,
        source=source,
        scale=scale,
        offset=offset,
    )


def extract_roi(
    radiograph: Radiograph,
    side: str,
    centre_xy: Sequence[float],
    config: PreprocessConfig,
    source: str = "caller",
) -> KneeRoi:
    """One knee's ROI: ``centre_xy`` = (col, row) in pixels of ``radiograph``.

    Raises ``KneeNotFound`` (centre outside the image, blank ROI) or ``BadParameter``.
    """
    return _extract(radiograph, side, centre_xy, config, source, float(radiograph.pixels.min()))


def extract_rois(
    radiograph: Radiograph,
    centres: Mapping[str, Sequence[float]],
    config: PreprocessConfig,
    source: str = "caller",
) -> list[KneeRoi]:
    """The ROIs of several knees of one radiograph, in the order of ``centres`` (side -> (col,
    row)); the padding value is computed once for all."""
    pad_value = float(radiograph.pixels.min())
    return [
        _extract(radiograph, side, centre, config, source, pad_value)
        for side, centre in centres.items()
    ]


def stack_rois(rois: Sequence[KneeRoi | np.ndarray]) -> np.ndarray:
    """The encoder batch of ROIs (or of their images, as the service's micro-batcher holds
    them): float32 [N, 1, encoder_px, encoder_px]."""
    if len(rois) == 0:
        raise ValueError("no ROIs to stack")
    images = [roi.image if isinstance(roi, KneeRoi) else roi for roi in rois]
    return np.stack(images)[:, None, :, :].astype(np.float32, copy=False)


KEYPOINTS_MAX_CHARS = 256
"""Longest ``keypoints`` text accepted: two knees with generous decimals need under 100, and the
bound keeps ``json.loads`` away from deep nesting (RecursionError) and huge numbers."""
KEYPOINT_MAX_ABS_PX = 1_000_000.0
"""Largest |column| or |row| accepted before the image is known; ``_check_centre`` then requires
the centre to lie inside the image. Bounded so no coordinate overflows a float computation."""


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def parse_keypoints(text: str | None) -> dict[str, tuple[float, float]] | None:
    """``{"left": [x, y], "right": [x, y]}`` (pixel column, row; ``right`` is the patient's right
    knee, on the image's left) -> ``{"LEFT": (x, y), "RIGHT": (x, y)}``.

    Any text gives either that or ``BadParameter`` (never another exception): at most
    ``KEYPOINTS_MAX_CHARS`` characters, no NaN/Infinity, coordinates finite numbers within
    ±``KEYPOINT_MAX_ABS_PX``, each knee once.
    """
    if text is None or text == "":
        return None
    if not isinstance(text, str):
        raise BadParameter('keypoints must be JSON text like {"left": [x, y], "right": [x, y]}')
    if len(text) > KEYPOINTS_MAX_CHARS:
        raise BadParameter(
            f"keypoints must be at most {KEYPOINTS_MAX_CHARS} characters, got {len(text)}"
        )
    try:
        raw = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError, OverflowError):
        # ValueError covers JSONDecodeError and ints past Python's digit limit.
        raise BadParameter(
            'keypoints must be JSON like {"left": [x, y], "right": [x, y]}'
        ) from None
    if not isinstance(raw, dict) or not raw:
        raise BadParameter('keypoints must be a JSON object like {"left": [x, y], "right": [x, y]}')
    centres: dict[str, tuple[float, float]] = {}
    for key, value in raw.items():
        side = key.upper()
        if side not in ("LEFT", "RIGHT"):
            raise BadParameter(f"keypoints: unknown knee {key[:20]!r} (use 'left' and 'right')")
        if side in centres:
            raise BadParameter(f"keypoints: the {key.lower()} knee is given twice")
        centres[side] = _coordinates(key, value)
    return centres


def _coordinates(key: str, value: object) -> tuple[float, float]:
    message = (
        f"keypoints: {key!r} must be [x, y], two finite numbers of pixels within "
        f"±{KEYPOINT_MAX_ABS_PX:.0f}"
    )
    if not isinstance(value, list) or len(value) != 2:
        raise BadParameter(message)
    coordinates = []
    for number in value:
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise BadParameter(message)
        try:
            as_float = float(number)
        except OverflowError:  # an int beyond the float range
            raise BadParameter(message) from None
        if not math.isfinite(as_float) or abs(as_float) > KEYPOINT_MAX_ABS_PX:
            raise BadParameter(message)
        coordinates.append(as_float)
    return coordinates[0], coordinates[1]
