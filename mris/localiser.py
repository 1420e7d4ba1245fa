"""Knee localiser runtime (onnxruntime, no torch): both joint centres from a whole radiograph.

Two stages, KNEEL-like, each a small function with its resolution stated:

1. ``global_input``: the whole radiograph resized (``mris.imageops.resize``) to
   ``global_input_px`` = (rows, cols), default 64 x 80 (about 5.4 mm/px for a 432 mm wide
   bilateral PA field), intensities scaled so the 99th percentile maps to 0.99. The global network
   (``localiser.onnx``; input ``image`` ``[N, 1, rows, cols]``; outputs ``centres`` ``[N, 2, 2]``
   = (x, y) as fractions of the width/height, knee 0 on the image's left = the patient's RIGHT,
   knee 1 = LEFT; ``confidence`` ``[N, 2]`` in [0, 1], that the knee is present) gives a coarse
   centre per knee.
2. ``refine_patch``: a ``refine_mm`` square (default 64 mm) around the coarse centre, cut by the
   shared ROI code (``mris.roi.extract_roi``: padded, RIGHT flipped, minimum -> 0, 99th pct -> 0.99)
   at ``refine_px`` (default 64 px, 1 mm/px). The refinement network (``localiser-refine.onnx``;
   input ``image`` ``[N, 1, p, p]``; outputs ``offset`` ``[N, 2]`` = (dx, dy) from the patch centre
   in patch px of the flipped patch, ``confidence`` ``[N]``) moves the centre; this runs
   ``refine_iterations`` times (default 2), each patch re-centred on the last estimate.

A knee's confidence is the global confidence times the last refinement's. ``locate_knees``
raises ``KneeNotFound`` when a requested knee's confidence is below ``confidence_threshold``
(default 0.5): the networks are trained with non-knee images (noise, blank, smooth fields, a knee
blanked out) as negatives, so such an image is refused rather than given a made-up centre.

Keypoints are (col, row) in source pixels with pixel centres at integers (the manifest's
convention), so a fraction ``u`` of the width is the column ``u * cols - 0.5``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import SIDES, PreprocessConfig
from mris.errors import BundleInvalid, KneeNotFound
from mris.imageops import resize

# knee index of the global network's output -> the patient's side (RIGHT is on the image's left)
GLOBAL_ORDER = ("RIGHT", "LEFT")
REFINE_FILE = "localiser-refine.onnx"


@dataclass(frozen=True)
class LocaliserConfig:
    global_input_px: tuple[int, int] = (64, 80)
    refine_mm: float = 64.0
    refine_px: int = 64
    refine_iterations: int = 2
    confidence_threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LocaliserConfig:
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in known}
        if "global_input_px" in values:
            values["global_input_px"] = tuple(int(v) for v in values["global_input_px"])
        return cls(**values)

    @property
    def refine_preprocess(self) -> PreprocessConfig:
        """The ROI constants of a refinement patch (the shared ROI code does the cutting)."""
        return PreprocessConfig(roi_size_mm=self.refine_mm, encoder_px=self.refine_px)


def scale_intensity(
    image: np.ndarray, percentile: float = 99.0, target: float = 0.99
) -> np.ndarray:
    """Scale so ``percentile`` of the pixels maps to ``target`` (minimum first moved to 0)."""
    image = image.astype(np.float32, copy=True)
    image -= float(image.min()) if image.size else 0.0
    level = float(np.percentile(image, percentile)) if image.size else 0.0
    if level > 0:
        image *= target / level
    return image


def global_input(pixels: np.ndarray, config: LocaliserConfig) -> np.ndarray:
    """Whole radiograph -> float32 ``global_input_px`` input of the global stage."""
    return scale_intensity(resize(pixels, config.global_input_px))


def global_to_source(fraction_xy: Iterable[float], shape: tuple[int, int]) -> tuple[float, float]:
    """Fractions of the global input's width/height -> (col, row) source pixels."""
    fx, fy = fraction_xy
    return float(fx) * shape[1] - 0.5, float(fy) * shape[0] - 0.5


def source_to_global(centre_xy: Iterable[float], shape: tuple[int, int]) -> tuple[float, float]:
    x, y = centre_xy
    return (float(x) + 0.5) / shape[1], (float(y) + 0.5) / shape[0]


def patch_scale(spacing_mm: float, config: LocaliserConfig) -> float:
    """Source pixels per patch pixel."""
    return config.refine_mm / spacing_mm / config.refine_px


def offset_to_source(
    centre_xy, offset_px, side: str, spacing_mm: float, config: LocaliserConfig
) -> tuple[float, float]:
    """A refinement offset (patch px, flipped frame for RIGHT) -> the new (col, row) source
    centre."""
    scale = patch_scale(spacing_mm, config)
    dx = float(offset_px[0]) * scale
    if side == "RIGHT" and config.refine_preprocess.flip_right:
        dx = -dx
    return float(centre_xy[0]) + dx, float(centre_xy[1]) + float(offset_px[1]) * scale


def source_to_offset(
    centre_xy, true_xy, side: str, spacing_mm: float, config: LocaliserConfig
) -> tuple[float, float]:
    """Inverse of ``offset_to_source``: the training target of a patch cut at ``centre_xy``."""
    scale = patch_scale(spacing_mm, config)
    dx = (float(true_xy[0]) - float(centre_xy[0])) / scale
    if side == "RIGHT" and config.refine_preprocess.flip_right:
        dx = -dx
    return dx, (float(true_xy[1]) - float(centre_xy[1])) / scale


def refine_patch(radiograph, side: str, centre_xy, config: LocaliserConfig) -> np.ndarray:
    """The refinement input around ``centre_xy``: float32 (refine_px, refine_px)."""
    from mris.roi import extract_roi

    centre = (float(centre_xy[0]), float(centre_xy[1]))
    return extract_roi(radiograph, side, centre, config.refine_preprocess, source="localiser").image


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    from mris.encoders import session_options

    if not Path(path).is_file():
        raise BundleInvalid(f"knee localiser {path} does not exist")
    options = session_options(threads)
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime raises its own types
        raise BundleInvalid(
            f"knee localiser {path} cannot be loaded by onnxruntime: {exc}"
        ) from exc


class KneeLocaliser:
    """The two ONNX stages and their constants."""

    def __init__(
        self,
        global_path: str | Path,
        refine_path: str | Path,
        config: LocaliserConfig,
        threads: int | None = None,
    ):
        self.config = config
        self.global_session = _session(Path(global_path), threads)
        self.refine_session = _session(Path(refine_path), threads)

    @classmethod
    def from_bundle(cls, bundle, threads: int | None = None) -> KneeLocaliser:
        """``bundle``: a ``ModelBundle`` or the path of a model bundle directory."""
        from mris.model_bundle import ModelBundle, load_model_bundle

        if not isinstance(bundle, ModelBundle):
            bundle = load_model_bundle(bundle)
        card = bundle.card.localiser
        if card is None:
            raise BundleInvalid(f"model bundle {bundle.root} has no knee localiser")
        refine = card.details.get("refine_file", REFINE_FILE)
        if refine not in bundle.card.files:
            raise BundleInvalid(
                f"model bundle {bundle.root}: localiser refinement {refine} is not in the card"
            )
        config = LocaliserConfig.from_dict(
            {**card.details.get("config", {}), "global_input_px": card.input_px}
        )
        return cls(bundle.path(card.file), bundle.path(refine), config, threads)

    def coarse(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global stage: ``[2, 2]`` (col, row) source centres in GLOBAL_ORDER and ``[2]``
        confidences."""
        image = global_input(pixels, self.config)[None, None]
        centres, confidence = self.global_session.run(["centres", "confidence"], {"image": image})
        shape = pixels.shape
        return (
            np.array([global_to_source(c, shape) for c in centres[0]]),
            confidence[0].astype(np.float64),
        )

    def refine(self, radiograph, side: str, centre_xy) -> tuple[tuple[float, float], float]:
        centre, confidence = (float(centre_xy[0]), float(centre_xy[1])), 1.0
        for _ in range(max(1, self.config.refine_iterations)):
            patch = refine_patch(radiograph, side, centre, self.config)[None, None]
            offset, conf = self.refine_session.run(["offset", "confidence"], {"image": patch})
            centre = offset_to_source(centre, offset[0], side, radiograph.spacing_mm, self.config)
            confidence = float(conf[0])
        return centre, confidence

    def locate(
        self, radiograph, sides: Iterable[str] = SIDES
    ) -> dict[str, tuple[tuple[float, float], float]]:
        """side -> ((col, row), confidence) for every requested side, found or not."""
        coarse, coarse_conf = self.coarse(radiograph.pixels)
        found = {}
        for index, side in enumerate(GLOBAL_ORDER):
            if side not in sides:
                continue
            try:
                centre, refine_conf = self.refine(radiograph, side, coarse[index])
            except KneeNotFound:  # the estimate left the image (or a blank patch): not found
                centre, refine_conf = (float(coarse[index][0]), float(coarse[index][1])), 0.0
            found[side] = (centre, float(coarse_conf[index]) * refine_conf)
        return found


def locate_knees(
    radiograph, localiser, config: LocaliserConfig | None = None, sides: Iterable[str] = SIDES
) -> dict[str, tuple[tuple[float, float], float]]:
    """Both (or the requested) knee centres of ``radiograph`` (a ``mris.dicom.Radiograph``).

    ``localiser``: a ``KneeLocaliser``, a ``ModelBundle`` or a bundle path; ``config`` overrides
    the bundle's constants (e.g. a stricter ``confidence_threshold``). Returns side ->
    ((col, row) px, confidence). Raises ``KneeNotFound`` when a requested knee's confidence is
    below the threshold or its centre falls outside the image.
    """
    if not isinstance(localiser, KneeLocaliser):
        localiser = KneeLocaliser.from_bundle(localiser)
    if config is not None:
        localiser.config = config
    sides = [s.upper() for s in sides]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise ValueError(f"sides must be LEFT/RIGHT, got {sorted(unknown)}")
    found = localiser.locate(radiograph, sides)
    rows, cols = radiograph.pixels.shape
    threshold = localiser.config.confidence_threshold
    for side in sides:
        (x, y), confidence = found[side]
        if confidence < threshold:
            raise KneeNotFound(
                f"no {side.lower()} knee found in the radiograph (localiser confidence "
                f"{confidence:.2f} "
                f"< {threshold:.2f}); give the joint centres as keypoints if this is a knee "
                "radiograph"
            )
        if not (0 <= x < cols and 0 <= y < rows):
            raise KneeNotFound(
                f"the {side.lower()} knee centre the localiser found lies outside the image"
            )
    return found


def evaluate_localiser(
    localiser, manifest, split: str = "test", max_images: int | None = None, tick=None
) -> dict[str, Any]:
    """Error of the localiser against the manifest's keypoints on one split.

    For every radiograph of ``split`` with keypoints: the Euclidean error per knee in mm (pixels
    times the radiograph's spacing), and whether both knees were found (confidence at or above
    the threshold). Returns median / 95th percentile / max error (mm), the fraction of images
    with both knees found, and counts.
    """
    from mris.dicom import read_radiograph

    if not isinstance(localiser, KneeLocaliser):
        localiser = KneeLocaliser.from_bundle(localiser)
    truth: dict[str, dict[str, tuple[float, float]]] = {}
    for row in manifest.select([split]):
        if row.keypoint_x is not None and row.keypoint_y is not None:
            truth.setdefault(row.radiograph_path, {})[row.side] = (row.keypoint_x, row.keypoint_y)
    paths = sorted(truth)[: max_images or None]
    errors_mm: list[float] = []
    both_found = 0
    threshold = localiser.config.confidence_threshold
    for done, path in enumerate(paths, start=1):
        radiograph = read_radiograph(manifest.resolve_path(path))
        found = localiser.locate(radiograph, list(truth[path]))
        ok = True
        for side, true_xy in truth[path].items():
            (x, y), confidence = found[side]
            errors_mm.append(
                float(np.hypot(x - true_xy[0], y - true_xy[1])) * radiograph.spacing_mm
            )
            ok &= confidence >= threshold
        both_found += int(ok)
        if tick is not None:
            tick(done, len(paths))
    errors = np.asarray(errors_mm)
    return {
        "split": split,
        "images": len(paths),
        "knees": int(errors.size),
        "median_error_mm": float(np.median(errors)) if errors.size else float("nan"),
        "p95_error_mm": float(np.percentile(errors, 95)) if errors.size else float("nan"),
        "max_error_mm": float(errors.max()) if errors.size else float("nan"),
        "all_knees_found_fraction": both_found / len(paths) if paths else float("nan"),
    }
