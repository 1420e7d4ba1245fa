"""What each compared method answers for a knee: a femoral and a tibial map in mm, NaN outside
the cartilage the method claims, from the same radiograph ROI.

- ``mris-s`` / ``mris-c``: ``MrisMethod`` runs ``mris.pipeline.Pipeline.search`` and
  ``mris.pipeline.synthesize_maps`` — the very code the service runs — on the ROIs (k
  neighbours, eq. 4 with the NaN rule asked, ``mris.synthesis.PAPER_NAN_RULE`` (``all``)
  unless told otherwise, as every comparison with the paper must; plus the per-pixel weighted
  standard deviation, each knee's calibration group and, when that rule is not the service's,
  the same neighbours synthesized with the service's rule for the uncertainty section).
- ``unet``: ``UnetMethod`` runs ``unet.onnx`` (onnxruntime, no torch) on the same ROI and
  resizes its [2, S, S] output back to the map grid with the shared resize. The network predicts
  a value everywhere; a user has no true mask, so its maps carry the ATLAS mask: the cartilage of
  the database mean map (``MeanMethod``), which holds no information about the knee.
- ``pix2pix``: ``UnetMethod`` on ``pix2pix.onnx`` (the generator of ``mris train-pix2pix``), the
  same way, with the same atlas mask.
- ``mean``: ``MeanMethod``, the database mean map — eq. 4 with EQUAL weights over every database
  map (NaN rule ``majority``: cartilage where at least half of the maps have cartilage), the same
  map for every knee: what one can say without looking at the radiograph. It keeps the majority
  rule whatever ``--nan-rule`` says: it is no retrieval of k neighbours, and ``all`` over every
  database map would keep only the cartilage every knee shares.
- ``oracle``: ``OracleMethod``, per knee and per cartilage the ONE database map closest to the
  true map — the best any single retrieval from this database could do. Chosen by the mean
  absolute error over the true map's cartilage pixels with the candidate's missing pixels counted
  as 0 mm (so a candidate cannot win by covering little): a masked squared-error shortlist by
  matrix products (``ORACLE_SHORTLIST`` candidates), then the exact absolute error on it.
- ``mr``: the true maps (Table 3's reference row).

``collect_rois`` makes the ROIs once for every method: ``Pipeline.prepare`` (decode, the
localiser or the manifest's keypoints, ``mris.roi``) per radiograph.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mris.constants import CARTILAGES
from mris.errors import BundleInvalid, KneeNotFound, MrisError
from mris.fsutil import sha256_file
from mris.imageops import resize
from mris.manifest import Manifest, ManifestRow
from mris.roi import KneeRoi
from mris.synthesis import DEFAULT_NAN_RULE, PAPER_NAN_RULE, NanRule

ORACLE_SHORTLIST = 16
MEAN_CHUNK_ROWS = 256


@dataclass
class MethodMaps:
    """One batch of answers: ``fc`` / ``tc`` float32 [B, H, W] mm (NaN outside), and, where the
    method has them (MRIS), the neighbours' weighted standard deviation, each knee's calibration
    group (``mris.calibration.neighbours_group``) and ``served_maps``: the same knees with the
    service's NaN rule when the method's own rule differs (the uncertainty section measures what
    the service returns)."""

    fc: np.ndarray
    tc: np.ndarray
    std: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)
    served_maps: MethodMaps | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.fc if name == "fc" else self.tc

    @property
    def served(self) -> MethodMaps:
        """The answer as the service would give it (itself when made with the service's rule)."""
        return self if self.served_maps is None else self.served_maps


# --------------------------------------------------------------------------------------- ROIs
@dataclass
class RoiSet:
    """The ROIs of the rows that could be read, in the order of ``rows``."""

    rows: list[ManifestRow]
    rois: list[KneeRoi]
    skipped: dict[str, list[str]] = field(default_factory=dict)  # reason -> pair ids
    keypoint_fallbacks: int = 0  # knees where the localiser found nothing and keypoints were used


def collect_rois(
    pipeline,
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    use_localiser: bool,
    tick: Callable[[int, int], None] | None = None,
) -> RoiSet:
    """One ``Pipeline.prepare`` per radiograph for the knees of ``rows`` on it.

    With ``use_localiser`` the knees are found as the service finds them; a knee the localiser
    misses falls back to the manifest's keypoints when it has them (counted). Without it the
    manifest's keypoints are used (rows without keypoints are skipped). A radiograph that cannot
    be read is skipped with its reason; nothing else is silently dropped.
    """
    from mris.pipeline import RequestOptions

    by_radiograph: dict[str, list[ManifestRow]] = {}
    for row in rows:
        by_radiograph.setdefault(row.radiograph_path, []).append(row)
    found: dict[str, KneeRoi] = {}
    skipped: dict[str, list[str]] = {}
    fallbacks = 0
    paths = list(by_radiograph)
    for done, path in enumerate(paths, start=1):
        knee_rows = {row.side: row for row in by_radiograph[path]}
        keypoints = {
            side: (row.keypoint_x, row.keypoint_y)
            for side, row in knee_rows.items()
            if row.keypoint_x is not None and row.keypoint_y is not None
        }
        attempts = [None, keypoints] if use_localiser else [keypoints]
        for attempt, given in enumerate(attempts):
            sides = tuple(knee_rows) if given is None else tuple(keypoints)
            if not sides:
                reason = "knee not found" if attempt else "no keypoints"
                skipped.setdefault(reason, []).extend(row.pair_id for row in knee_rows.values())
                break
            try:
                prepared = pipeline.prepare(
                    manifest.resolve_path(path), RequestOptions(knees=sides, keypoints=given)
                )
            except KneeNotFound:
                if attempt + 1 < len(attempts):
                    continue
                skipped.setdefault("knee not found", []).extend(knee_rows[s].pair_id for s in sides)
                break
            except MrisError as exc:
                skipped.setdefault(type(exc).__name__, []).extend(
                    row.pair_id for row in knee_rows.values()
                )
                break
            fallbacks += len(sides) if (use_localiser and given is not None) else 0
            for roi in prepared.rois:
                found[knee_rows[roi.side].pair_id] = roi
            missing = [row.pair_id for side, row in knee_rows.items() if side not in sides]
            if (
                missing
            ):  # in a fallback these knees were missed by the localiser and have no keypoints
                reason = (
                    "knee not found" if (use_localiser and given is not None) else "no keypoints"
                )
                skipped.setdefault(reason, []).extend(missing)
            break
        if tick is not None:
            tick(done, len(paths))
    kept = [row for row in rows if row.pair_id in found]
    return RoiSet(
        rows=kept,
        rois=[found[row.pair_id] for row in kept],
        skipped=skipped,
        keypoint_fallbacks=fallbacks,
    )


# ------------------------------------------------------------------------------------ methods
class MrisMethod:
    """MRIS-S or MRIS-C through the serving pipeline: maps with ``nan_rule`` and, when it is
    not the service's (``DEFAULT_NAN_RULE``), the same neighbours synthesized with the
    service's rule as ``served_maps`` (one search, two cheap syntheses)."""

    def __init__(self, pipeline, k: int, nan_rule: NanRule = PAPER_NAN_RULE):
        self.pipeline = pipeline
        self.k = k
        self.nan_rule = nan_rule

    def predict(self, rois: Sequence[KneeRoi]) -> MethodMaps:
        from mris.calibration import neighbours_group
        from mris.pipeline import synthesize_maps

        index = self.pipeline.index
        hits = self.pipeline.search(rois, self.k)
        knees = [synthesize_maps(h, index, self.k, self.nan_rule) for h in hits]
        groups = [neighbours_group(knee, index.rows) for knee in knees]
        answer = _stacked(knees, groups)
        if self.nan_rule != DEFAULT_NAN_RULE:
            served = [synthesize_maps(h, index, self.k, DEFAULT_NAN_RULE) for h in hits]
            answer.served_maps = _stacked(served, groups)
        return answer


def _stacked(knees, groups: list[str]) -> MethodMaps:
    """``KneeMaps`` of a batch -> one ``MethodMaps``."""
    return MethodMaps(
        fc=np.stack([knee.maps_mm["fc"] for knee in knees]),
        tc=np.stack([knee.maps_mm["tc"] for knee in knees]),
        std={name: np.stack([knee.std_mm[name] for knee in knees]) for name in CARTILAGES},
        groups=groups,
    )


def database_mean_maps(
    store_rows: Callable[[str, np.ndarray], np.ndarray],
    count: int,
    chunk_rows: int = MEAN_CHUNK_ROWS,
) -> dict[str, np.ndarray]:
    """The mean map per cartilage over ``count`` database rows read in chunks by
    ``store_rows(cartilage, row_ids [1, n]) -> [1, n, H, W]``; equals ``synthesize`` with equal
    similarities over all rows (checked by a test), without holding every map at once."""
    means = {}
    for name in CARTILAGES:
        total = present = None
        for start in range(0, count, chunk_rows):
            block = np.asarray(
                store_rows(name, np.arange(start, min(count, start + chunk_rows))[None])[0],
                np.float64,
            )
            mask = np.isfinite(block)
            block_sum = np.where(mask, block, 0.0).sum(axis=0)
            total = block_sum if total is None else total + block_sum
            present = mask.sum(axis=0) if present is None else present + mask.sum(axis=0)
        share = present / count
        cartilage = share >= 0.5 - 1e-6
        mean = np.where(cartilage, total / np.maximum(present, 1), np.nan)
        means[name] = mean.astype(np.float32)
    return means


class MeanMethod:
    def __init__(self, mean_maps: dict[str, np.ndarray]):
        self.mean_maps = mean_maps

    @classmethod
    def from_index(cls, index) -> MeanMethod:
        return cls(database_mean_maps(index.neighbour_maps, index.card.rows))

    def predict(self, rois: Sequence[KneeRoi]) -> MethodMaps:
        n = len(rois)
        return MethodMaps(
            fc=np.repeat(self.mean_maps["fc"][None], n, axis=0),
            tc=np.repeat(self.mean_maps["tc"][None], n, axis=0),
        )

    @property
    def atlas_masks(self) -> dict[str, np.ndarray]:
        return {name: np.isfinite(mean) for name, mean in self.mean_maps.items()}


class UnetMethod:
    """``unet.onnx`` (``mris train-unet``) or ``pix2pix.onnx`` (``mris train-pix2pix``, ``card``
    ``pix2pix-card.json``): ROI [N, 1, S, S] -> [N, 2, S, S] mm (fc, tc)."""

    def __init__(
        self,
        unet_dir: str | Path,
        atlas_masks: dict[str, np.ndarray],
        device: str = "auto",
        threads: int | None = None,
        card: str = "unet-card.json",
    ):
        import onnxruntime as ort

        from mris.encoders import default_threads, select_providers

        unet_dir = Path(unet_dir)
        card_path = unet_dir / card
        if not card_path.is_file():
            raise BundleInvalid(
                f"{unet_dir} is not a trained baseline folder: {card} is missing "
                "(train it with mris train-unet or mris train-pix2pix)"
            )
        self.card = json.loads(card_path.read_text())
        onnx_path = unet_dir / self.card["file"]
        if (
            not onnx_path.is_file()
            or sha256_file(onnx_path) != self.card["sha256"][self.card["file"]]
        ):
            raise BundleInvalid(f"{onnx_path} is missing or does not match its sha256 in {card}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=select_providers(device)
        )
        self.input_name = self.session.get_inputs()[0].name
        self.atlas_masks = atlas_masks

    def predict(self, rois: Sequence[KneeRoi]) -> MethodMaps:
        batch = np.stack([roi.image for roi in rois]).astype(np.float32)[:, None]
        (out,) = self.session.run(None, {self.input_name: batch})
        maps = {}
        for channel, name in enumerate(CARTILAGES):
            shape = self.atlas_masks[name].shape
            resized = np.stack([resize(out[i, channel], shape) for i in range(len(rois))])
            maps[name] = np.where(self.atlas_masks[name][None], resized, np.nan).astype(np.float32)
        return MethodMaps(fc=maps["fc"], tc=maps["tc"])


class OracleMethod:
    """The single database map closest to the truth (needs the true maps: an upper bound).

    Memory: one float32 copy of the database maps per cartilage (NaN -> 0) beside the store it
    reads them from (rows x H x W x 4 bytes each: 110 MB for the demo cohort, about 5 GB for
    13,600 maps of 310 x 310). Squares are formed in chunks, never stored.
    """

    def __init__(
        self,
        rows_of: Callable[[str, np.ndarray], np.ndarray],
        count: int,
        shortlist: int = ORACLE_SHORTLIST,
        chunk_rows: int = MEAN_CHUNK_ROWS,
    ):
        self.rows_of = rows_of  # (cartilage, row ids [1, n]) -> maps [1, n, H, W]
        self.count = count
        self.shortlist = shortlist
        self.chunk_rows = chunk_rows
        self.filled: dict[str, np.ndarray] = {}
        for name in CARTILAGES:
            filled = None
            for start in range(0, count, chunk_rows):
                block = np.asarray(
                    rows_of(name, np.arange(start, min(count, start + chunk_rows))[None])[0],
                    np.float32,
                )
                block = np.nan_to_num(block.reshape(block.shape[0], -1), nan=0.0)
                if filled is None:
                    filled = np.empty((count, block.shape[1]), np.float32)
                filled[start : start + block.shape[0]] = block
            self.filled[name] = filled
        self.chosen: dict[str, list[int]] = {"fc": [], "tc": []}

    @classmethod
    def from_index(cls, index, shortlist: int = ORACLE_SHORTLIST) -> OracleMethod:
        return cls(index.neighbour_maps, index.card.rows, shortlist)

    @classmethod
    def from_arrays(
        cls, database_maps: dict[str, np.ndarray], shortlist: int = ORACLE_SHORTLIST
    ) -> OracleMethod:
        """From in-memory maps ``{"fc": [D, H, W], "tc": [D, H, W]}``."""
        return cls(lambda name, ids: database_maps[name][ids], len(database_maps["fc"]), shortlist)

    def best_rows(self, name: str, truth_mm: np.ndarray) -> np.ndarray:
        """int64 [B]: per true map [B, H, W] the database row with the lowest absolute error over
        the true cartilage (candidate NaN counted as 0 mm)."""
        truth = np.asarray(truth_mm, np.float32).reshape(truth_mm.shape[0], -1)
        mask = np.isfinite(truth).astype(np.float32)
        t = np.nan_to_num(truth, nan=0.0)
        database = self.filled[name]
        # sum over the true mask of (t - d)^2 = sum m t^2 - 2 t . d + m . d^2  (t is 0 off the mask)
        squared = (t * t).sum(axis=1, keepdims=True) - 2 * (t @ database.T)
        for start in range(0, self.count, self.chunk_rows):
            chunk = database[start : start + self.chunk_rows]
            squared[:, start : start + chunk.shape[0]] += mask @ (chunk * chunk).T
        size = min(self.shortlist, squared.shape[1])
        candidates = np.argpartition(squared, size - 1, axis=1)[:, :size]
        best = np.empty(truth.shape[0], np.int64)
        for i in range(truth.shape[0]):
            on = mask[i] > 0
            errors = np.abs(database[candidates[i]][:, on] - t[i, on]).mean(axis=1)
            best[i] = candidates[i][int(np.argmin(errors))]
        return best

    def predict_from_truth(self, truth: dict[str, np.ndarray]) -> MethodMaps:
        out = {}
        for name in CARTILAGES:
            rows = self.best_rows(name, truth[name])
            self.chosen[name].extend(int(r) for r in rows)
            out[name] = np.asarray(self.rows_of(name, rows[None])[0], np.float32)
        return MethodMaps(fc=out["fc"], tc=out["tc"])
