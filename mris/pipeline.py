"""The synthesis pipeline, outside FastAPI: DICOM bytes -> ``Radiograph`` -> knee ROIs ->
radiograph embeddings -> neighbours per region -> synthesized maps (eq. 4).

The service calls the three stages separately (``prepare`` per request in a worker thread,
``search`` once per micro-batch of ROIs from many requests, ``assemble`` per request);
``run`` chains them for in-process callers (``mris demo``, the evaluation, the benchmarks), so
every caller runs the same code.

Which neighbours make which map: variant ``separate`` (MRIS-S) searches the fc index with the
fc radiograph encoder and averages femoral maps of those neighbours, and likewise for tc;
variant ``combined`` (MRIS-C) searches one index and averages both maps of its neighbours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import PreprocessConfig
from mris.dicom import DecodeLimits, Radiograph, read_radiograph
from mris.encoders import OnnxEncoder
from mris.errors import BadParameter, BundleMismatch
from mris.model_bundle import VARIANT_REGIONS, ModelBundle, load_model_bundle
from mris.options import KNEE_CHOICES, MAX_K, OPTION_MAX_CHARS, RequestOptions
from mris.roi import KneeRoi, extract_roi, parse_keypoints
from mris.synthesis import DEFAULT_NAN_RULE, NanRule, similarity_weights, synthesize

MAP_NAMES = ("fc", "tc")


@dataclass
class Prepared:
    """A decoded request: the knee ROIs in the order asked, and what the answer reports."""

    rois: list[KneeRoi]
    spacing_source: str
    confidences: dict[str, float | None]


@dataclass
class Hits:
    """One ROI's neighbours in one region: cosine similarities and database rows, best first."""

    similarities: np.ndarray  # float32 [k]
    rows: np.ndarray  # int64 [k]


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
        index = load_index_bundle(index_root, model_card=model.card, device=device, resident_maps=True)
        limits = DecodeLimits()
        if max_pixels is not None:
            side = math.isqrt(max_pixels)
            limits = DecodeLimits(max_rows=max(side, limits.max_rows), max_columns=max(side, limits.max_columns),
                                  max_pixel_bytes=max_pixels * 4)
        return cls(model, index, variant, device, intra_op_threads, limits)

    @property
    def index_version(self) -> str:
        return self.index.card.version

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
                raise BadParameter(f"keypoints lack the {' and '.join(missing)} knee (or set knees=...)")
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
        rois = [extract_roi(radiograph, side, centres[side], self.config, source=source) for side in options.knees]
        return Prepared(rois=rois, spacing_source=radiograph.spacing_source, confidences=confidences)

    # ------------------------------------------------------------------ stage 2: per batch
    def search(self, images: Sequence[np.ndarray], k: int) -> list[dict[str, Hits]]:
        """Encode a batch of ROI images with each region's radiograph encoder and search that
        region's index: one encoder run and one FAISS search per region for the whole batch."""
        batch = np.stack([np.asarray(image, np.float32) for image in images])[:, None]
        per_region = {}
        for region in self.regions:
            queries = self.encoders[region].embed(batch)
            per_region[region] = self.index.search(region, queries, k)
        return [
            {region: Hits(per_region[region][0][i], per_region[region][1][i]) for region in self.regions}
            for i in range(len(images))
        ]

    # ------------------------------------------------------------------ stage 3: per request
    def assemble(self, prepared: Prepared, hits: Sequence[dict[str, Hits]], k: int,
                 with_maps: bool = True, nan_rule: NanRule = DEFAULT_NAN_RULE) -> list[KneeResult]:
        """Neighbours (ids, similarities, weights) and, ``with_maps``, eq. 4 with ``nan_rule``."""
        results = []
        for roi, roi_hits in zip(prepared.rois, hits):
            neighbours: dict[str, list[Neighbour]] = {}
            maps: dict[str, np.ndarray] = {}
            stds: dict[str, np.ndarray] = {}
            for region, hit in roi_hits.items():
                rows = np.asarray(hit.rows[:k], np.int64)
                similarities = np.asarray(hit.similarities[:k], np.float32)
                keep = rows >= 0
                rows, similarities = rows[keep], similarities[keep]
                weights = similarity_weights(similarities[None])[0]
                neighbours[region] = [
                    Neighbour(
                        pair_id=self.index.rows[int(row)].pair_id,
                        row=int(row),
                        similarity=float(similarity),
                        weight=float(weight),
                        metadata=_public_metadata(self.index.rows[int(row)].to_dict()),
                    )
                    for row, similarity, weight in zip(rows, similarities, weights)
                ]
                if with_maps:
                    for name in self.index.cartilages(region):
                        neighbour_maps = self.index.neighbour_maps(name, rows[None])
                        out = synthesize(neighbour_maps, similarities[None], nan_rule=nan_rule)
                        maps[name] = out.thickness_mm[0]
                        stds[name] = out.std_mm[0]
            results.append(
                KneeResult(
                    side=roi.side,
                    roi=roi,
                    spacing_source=prepared.spacing_source,
                    confidence=prepared.confidences.get(roi.side),
                    neighbours=neighbours,
                    maps_mm=maps,
                    std_mm=stds,
                    nan_rule=nan_rule if with_maps else None,
                )
            )
        return results

    def run(self, data: bytes | str | Path, options: RequestOptions | None = None,
            with_maps: bool = True) -> list[KneeResult]:
        """The whole path in-process, for one radiograph."""
        options = options or RequestOptions()
        prepared = self.prepare(data, options)
        hits = self.search([roi.image for roi in prepared.rois], options.k)
        return self.assemble(prepared, hits, options.k, with_maps, options.nan_rule)


__all__ = [
    "BundleMismatch",
    "Hits",
    "KNEE_CHOICES",
    "KneeResult",
    "MAX_K",
    "Neighbour",
    "OPTION_MAX_CHARS",
    "Pipeline",
    "Prepared",
    "RequestOptions",
    "parse_keypoints",
]
