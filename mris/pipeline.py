"""The synthesis pipeline, outside FastAPI: DICOM bytes -> ``Radiograph`` -> knee ROIs ->
radiograph embeddings -> neighbours per region -> synthesized maps (eq. 4).

The service calls the three stages separately (``prepare`` per request in a worker thread,
``search`` once per micro-batch of ROIs from many requests, ``assemble`` per request);
``run`` chains them for in-process callers (``mris demo``, the evaluation, the benchmarks), so
every caller runs the same code.

Two of the stages are plain typed functions, for callers that hold no ``Pipeline`` (an engine's
actor, a test) or need no request around the answer:

- ``search_batch(rois, k, encoders=, index=)``: the batch unit, ROIs in, ``Hits`` out (one
  encoder batch and one FAISS search per region). ``Pipeline.search`` and the service's
  micro-batcher run it; the encoders and the index are anything with ``RoiEncoder.embed`` and
  ``NeighbourIndex.search``.
- ``synthesize_maps(hits, maps, k, nan_rule)``: the synthesis step, one knee's ``Hits`` in,
  ``KneeMaps`` out (eq. 4 per cartilage of each region, no request decoration).
  ``Pipeline.assemble`` adds the request's ROI, spacing source, confidence and the neighbours'
  ids; the evaluation and the benchmarks call it directly. With an ``IndexBundle`` (a
  ``SynthesizingMaps``) the maps are read in place from the bundle's rows; any other
  ``NeighbourMaps`` hands over gathered maps.

Which neighbours make which map: variant ``separate`` (MRIS-S) searches the fc index with the
fc radiograph encoder and averages femoral maps of those neighbours, and likewise for tc;
variant ``combined`` (MRIS-C) searches one index and averages both maps of its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# numpy.ma imported now, in this thread: a worker thread's first np.unique would import it and
# build ASTs beside another thread's (mris.npyio says why that fails on CPython 3.11).
import mris.npyio  # noqa: E402, F401
from mris.calibration import neighbours_group
from mris.constants import PreprocessConfig
from mris.dicom import DecodeLimits, Radiograph, SourceIdentity, read_radiograph
from mris.encoders import OnnxEncoder
from mris.errors import BadParameter, BundleMismatch
from mris.model_bundle import VARIANT_REGIONS, ModelBundle, load_model_bundle
from mris.options import KNEE_CHOICES, MAX_K, OPTION_MAX_CHARS, RequestOptions
from mris.roi import KneeRoi, extract_roi, parse_keypoints, stack_rois
from mris.synthesis import (
    DEFAULT_NAN_RULE,
    NanRule,
    Synthesis,
    similarity_weights,
    synthesize,
)


@dataclass
class Prepared:
    """A decoded request: the knee ROIs in the order asked, and what the answer reports.

    ``source`` is the radiograph's identity (``mris.dicom.SourceIdentity``: UIDs, patient and
    study attributes), kept for a DICOM result made from this request; it is left out of
    ``repr`` and must never be logged or put into an answer's text."""

    rois: list[KneeRoi]
    spacing_source: str
    confidences: dict[str, float | None]
    source: SourceIdentity | None = field(default=None, repr=False)


@dataclass
class Hits:
    """One ROI's neighbours in one region: cosine similarities and database rows, best first."""

    similarities: np.ndarray  # float32 [k]
    rows: np.ndarray  # int64 [k]

    def first(self, k: int) -> Hits:
        """The best ``k`` neighbours, without FAISS's "no result" slots (row -1)."""
        rows = np.asarray(self.rows[:k], np.int64)
        similarities = np.asarray(self.similarities[:k], np.float32)
        keep = rows >= 0
        return Hits(similarities[keep], rows[keep])


@dataclass(frozen=True)
class KneeMaps:
    """One knee's synthesis (eq. 4), without request decoration.

    - ``neighbours``: region -> the ``Hits`` used (best first, at most k, no empty slots).
    - ``weights``: region -> float32 [k'], eq. 4's w_i of those neighbours.
    - ``maps_mm`` / ``std_mm``: cartilage (``fc``/``tc``) -> float32 (H, W) mm, NaN outside
      cartilage; empty when made without maps.
    - ``nan_rule``: the rule that made the maps (None without maps).
    """

    neighbours: dict[str, Hits]
    weights: dict[str, np.ndarray]
    maps_mm: dict[str, np.ndarray]
    std_mm: dict[str, np.ndarray]
    nan_rule: str | None


class RoiEncoder(Protocol):
    """What ``search_batch`` needs of a region's radiograph encoder (``OnnxEncoder``, an
    engine's remote encoder, a test's fake)."""

    def embed(self, images: np.ndarray) -> np.ndarray:
        """float32 [N, 1, S, S] -> float32 [N, D], unit L2 norm."""
        ...


class NeighbourIndex(Protocol):
    """What ``search_batch`` needs of the index (``mris.index.bundle.IndexBundle``)."""

    def search(self, region: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 [N, D] queries -> (float32 [N, k] similarities, int64 [N, k] rows), best
        first; rows -1 where the index has no more neighbours."""
        ...


class NeighbourMaps(Protocol):
    """What ``synthesize_maps`` needs of the database maps (``IndexBundle``)."""

    def cartilages(self, region: str) -> list[str]:
        """The maps a region's neighbours make (``fc``, ``tc``, or both for ``combined``)."""
        ...

    def neighbour_maps(self, cartilage: str, row_ids: np.ndarray) -> np.ndarray:
        """int64 [N, k] rows -> [N, k, H, W] maps in mm (float16/32), NaN outside cartilage."""
        ...


class SynthesizingMaps(NeighbourMaps, Protocol):
    """``NeighbourMaps`` that also run eq. 4 over their own rows (``IndexBundle``: read in place
    from its maps array, no gathered copy). ``synthesize_maps`` uses it where present."""

    def synthesize_neighbours(
        self, cartilage: str, row_ids: np.ndarray, similarities: np.ndarray, nan_rule: NanRule
    ) -> Synthesis:
        """int64 [N, k] rows, float32 [N, k] similarities -> ``mris.synthesis.synthesize`` of
        ``neighbour_maps(cartilage, row_ids)`` (to float32 rounding)."""
        ...


def search_batch(
    rois: Sequence[KneeRoi | np.ndarray],
    k: int,
    *,
    encoders: Mapping[str, RoiEncoder],
    index: NeighbourIndex,
) -> list[dict[str, Hits]]:
    """The batch unit: ROIs (or their images) in, each ROI's ``Hits`` per region out, in order.

    The ROIs become one encoder batch (``mris.roi.stack_rois``); per region (the keys of
    ``encoders``, in their order) one ``embed`` and one ``index.search`` of ``k`` serve all."""
    batch = stack_rois(rois)
    per_region = {}
    for region, encoder in encoders.items():
        per_region[region] = index.search(region, encoder.embed(batch), k)
    return [
        {region: Hits(found[0][i], found[1][i]) for region, found in per_region.items()}
        for i in range(len(rois))
    ]


def synthesize_maps(
    hits: Mapping[str, Hits],
    maps: NeighbourMaps,
    k: int,
    nan_rule: NanRule = DEFAULT_NAN_RULE,
    with_maps: bool = True,
) -> KneeMaps:
    """The synthesis step for one knee: its ``Hits`` per region (from ``search_batch``) ->
    ``KneeMaps``. Per region the best ``k`` neighbours and their weights; ``with_maps``, also
    eq. 4 with ``nan_rule`` for each of the region's cartilages: ``maps.synthesize_neighbours``
    where ``maps`` has it (``SynthesizingMaps``), else ``mris.synthesis.synthesize`` of
    ``maps.neighbour_maps``."""
    neighbours: dict[str, Hits] = {}
    weights: dict[str, np.ndarray] = {}
    maps_mm: dict[str, np.ndarray] = {}
    std_mm: dict[str, np.ndarray] = {}
    in_place = getattr(maps, "synthesize_neighbours", None)
    for region, region_hits in hits.items():
        best = region_hits.first(k)
        neighbours[region] = best
        weights[region] = similarity_weights(best.similarities[None])[0]
        if with_maps:
            for name in maps.cartilages(region):
                rows, similarities = best.rows[None], best.similarities[None]
                if in_place is not None:
                    out = in_place(name, rows, similarities, nan_rule)
                else:
                    out = synthesize(
                        maps.neighbour_maps(name, rows), similarities, nan_rule=nan_rule
                    )
                maps_mm[name] = out.thickness_mm[0]
                std_mm[name] = out.std_mm[0]
    return KneeMaps(neighbours, weights, maps_mm, std_mm, nan_rule if with_maps else None)


@dataclass
class Neighbour:
    pair_id: str
    row: int
    similarity: float
    weight: float
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class KneeResult:
    side: str
    roi: KneeRoi
    spacing_source: str
    confidence: float | None
    neighbours: dict[str, list[Neighbour]]
    maps_mm: dict[str, np.ndarray]  # "fc"/"tc" -> float32 (H, W), NaN outside cartilage
    std_mm: dict[str, np.ndarray]
    nan_rule: str | None = None  # the rule that made maps_mm (None without maps)
    # Calibrated intervals (mris.calibration) when the index bundle holds a calibration:
    # cartilage -> float32 (H, W) lower / upper bounds in mm; empty otherwise.
    lower_mm: dict[str, np.ndarray] = field(default_factory=dict)
    upper_mm: dict[str, np.ndarray] = field(default_factory=dict)
    calibration_group: str | None = None  # the knee's group (neighbours' weighted KL grade)

    @property
    def reliability_mm(self) -> float | None:
        """The knee's reliability figure: the mean width (upper - lower, mm) of its calibrated
        intervals over every cartilage pixel; None without intervals. Smaller is more certain:
        with coverage 0.9, 9 in 10 true values lie in bands this wide on average."""
        widths = [
            (self.upper_mm[c] - self.lower_mm[c])[np.isfinite(self.lower_mm[c])]
            for c in self.lower_mm
        ]
        widths = [w for w in widths if w.size]
        return float(np.concatenate(widths).mean()) if widths else None


def _public_metadata(row: dict[str, Any]) -> dict[str, Any]:
    return {key: row[key] for key in ("subject_id", "side", "visit_month", "klg") if key in row}


class Pipeline:
    """Loaded encoders, localiser and index bundle for one variant."""

    def __init__(
        self,
        model: ModelBundle,
        index: Any,
        variant: str,
        device: str = "auto",
        intra_op_threads: int = 0,
        limits: DecodeLimits | None = None,
    ) -> None:
        from mris.index.bundle import check_encoders

        if variant not in VARIANT_REGIONS:
            raise BadParameter(f"variant must be separate or combined, not {variant!r}")
        if index.card.variant != variant:
            raise BundleMismatch(
                f"index bundle {index.card.version} is variant '{index.card.variant}', "
                f"but variant '{variant}' is asked"
            )
        check_encoders(index.card, model.card)  # the index was built with these encoders
        self.model = model
        self.index = index
        self.variant = variant
        self.regions = VARIANT_REGIONS[variant]
        self.config: PreprocessConfig = model.card.preprocess_config
        self.limits = limits or DecodeLimits()
        threads = intra_op_threads or None
        self.encoders = {
            region: OnnxEncoder(
                model.encoder_path(variant, region, "radiograph"),
                device=device,
                intra_op_threads=threads,
                batch_size=64,
            )
            for region in self.regions
        }
        self.localiser = None
        if model.localiser_path is not None:
            from mris.localiser import KneeLocaliser

            self.localiser = KneeLocaliser.from_bundle(model, threads=threads)

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        index_root: str | Path,
        variant: str = "separate",
        device: str = "auto",
        intra_op_threads: int = 0,
        max_pixels: int | None = None,
    ) -> Pipeline:
        """Load the model bundle and the index bundle ``index_root/current`` points to (or
        ``index_root`` itself when it is a bundle)."""
        from mris.index.bundle import load_index_bundle

        model = load_model_bundle(model_dir)
        # Maps resident in memory: random row reads from a cold memory map are slow (PERF_FACTS).
        index = load_index_bundle(
            index_root, model_card=model.card, device=device, resident_maps=True
        )
        limits = DecodeLimits()
        if max_pixels is not None:
            side = math.isqrt(max_pixels)
            limits = DecodeLimits(
                max_rows=max(side, limits.max_rows),
                max_columns=max(side, limits.max_columns),
                max_pixel_bytes=max_pixels * 4,
            )
        return cls(model, index, variant, device, intra_op_threads, limits)

    @property
    def index_version(self) -> str:
        return self.index.card.version

    @property
    def coverage(self) -> float | None:
        """The stated coverage of the intervals served (the index bundle's calibration), or
        None when the bundle has no calibration."""
        calibration = getattr(self.index, "calibration", None)
        return None if calibration is None else calibration.coverage

    @property
    def versions(self) -> dict[str, str]:
        """What made the maps, as a DICOM result names it (``mris.dicom_out``): the model (the
        variant and its card's creation time) and the index bundle's version."""
        return {"model": f"{self.variant} {self.model.card.created}", "index": self.index_version}

    def info(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "index_version": self.index_version,
            "model_card": self.model.card.model_dump(mode="json"),
            "index_card": self.index.card.model_dump(mode="json"),
            "localiser": self.localiser is not None,
        }

    # ------------------------------------------------------------------ stage 1: per request
    def locate(self, radiograph: Radiograph, options: RequestOptions) -> tuple[dict, dict]:
        """Joint centres for the knees asked: the caller's keypoints, else the localiser."""
        if options.keypoints is not None:
            missing = [side.lower() for side in options.knees if side not in options.keypoints]
            if missing:
                raise BadParameter(
                    f"keypoints lack the {' and '.join(missing)} knee (or set knees=...)"
                )
            return {side: options.keypoints[side] for side in options.knees}, {
                side: None for side in options.knees
            }
        if self.localiser is None:
            raise BadParameter("this model bundle has no knee localiser: give keypoints")
        from mris.localiser import locate_knees

        found = locate_knees(radiograph, self.localiser, sides=options.knees)  # raises KneeNotFound
        return (
            {side: found[side][0] for side in options.knees},
            {side: float(found[side][1]) for side in options.knees},
        )

    def prepare(self, data: bytes | str | Path | Radiograph, options: RequestOptions) -> Prepared:
        """Decode (unless given a ``Radiograph`` already decoded, as the service's decode
        sandbox hands it), find the knees and cut their ROIs."""
        if isinstance(data, Radiograph):
            radiograph = data
        else:
            radiograph = read_radiograph(data, spacing_mm=options.spacing_mm, limits=self.limits)
        centres, confidences = self.locate(radiograph, options)
        source = "caller" if options.keypoints is not None else "localiser"
        rois = [
            extract_roi(radiograph, side, centres[side], self.config, source=source)
            for side in options.knees
        ]
        return Prepared(
            rois=rois,
            spacing_source=radiograph.spacing_source,
            confidences=confidences,
            source=radiograph.source,
        )

    # ------------------------------------------------------------------ stage 2: per batch
    def search(self, rois: Sequence[KneeRoi | np.ndarray], k: int) -> list[dict[str, Hits]]:
        """``search_batch`` with this pipeline's encoders and index: one encoder run and one
        FAISS search per region for the whole batch of ROIs (or ROI images)."""
        return search_batch(rois, k, encoders=self.encoders, index=self.index)

    # ------------------------------------------------------------------ stage 3: per request
    def assemble(
        self,
        prepared: Prepared,
        hits: Sequence[dict[str, Hits]],
        k: int,
        with_maps: bool = True,
        nan_rule: NanRule = DEFAULT_NAN_RULE,
    ) -> list[KneeResult]:
        """``synthesize_maps`` per knee (neighbours and, ``with_maps``, eq. 4 with
        ``nan_rule``), decorated with the request's ROI, spacing source and confidence and the
        neighbours' ids and public metadata; with maps and a calibrated index bundle, also the
        knee's calibrated intervals (``mris.calibration``)."""
        results = []
        calibration = getattr(self.index, "calibration", None)
        for roi, roi_hits in zip(prepared.rois, hits):
            knee = synthesize_maps(roi_hits, self.index, k, nan_rule, with_maps)
            lower: dict[str, np.ndarray] = {}
            upper: dict[str, np.ndarray] = {}
            group = None
            if calibration is not None and with_maps:
                group = neighbours_group(knee, self.index.rows)
                lower, upper = calibration.intervals(knee.maps_mm, knee.std_mm, group)
            results.append(
                KneeResult(
                    side=roi.side,
                    roi=roi,
                    spacing_source=prepared.spacing_source,
                    confidence=prepared.confidences.get(roi.side),
                    neighbours={
                        region: self._neighbours(knee, region) for region in knee.neighbours
                    },
                    maps_mm=knee.maps_mm,
                    std_mm=knee.std_mm,
                    nan_rule=knee.nan_rule,
                    lower_mm=lower,
                    upper_mm=upper,
                    calibration_group=group,
                )
            )
        return results

    def _neighbours(self, knee: KneeMaps, region: str) -> list[Neighbour]:
        best, weights = knee.neighbours[region], knee.weights[region]
        return [
            Neighbour(
                pair_id=self.index.rows[int(row)].pair_id,
                row=int(row),
                similarity=float(similarity),
                weight=float(weight),
                metadata=_public_metadata(self.index.rows[int(row)].to_dict()),
            )
            for row, similarity, weight in zip(best.rows, best.similarities, weights)
        ]

    def run(
        self,
        data: bytes | str | Path,
        options: RequestOptions | None = None,
        with_maps: bool = True,
    ) -> list[KneeResult]:
        """The whole path in-process, for one radiograph."""
        options = options or RequestOptions()
        prepared = self.prepare(data, options)
        hits = self.search(prepared.rois, options.k)
        return self.assemble(prepared, hits, options.k, with_maps, options.nan_rule)


__all__ = [
    "BundleMismatch",
    "Hits",
    "KNEE_CHOICES",
    "KneeMaps",
    "KneeResult",
    "MAX_K",
    "Neighbour",
    "NeighbourIndex",
    "NeighbourMaps",
    "OPTION_MAX_CHARS",
    "Pipeline",
    "Prepared",
    "RequestOptions",
    "RoiEncoder",
    "SynthesizingMaps",
    "parse_keypoints",
    "search_batch",
    "synthesize_maps",
]
