"""One shard through the serving pipeline, its outputs written atomically.

Per input: decode (the decode sandbox when given, as the service: a crafted file can crash or
hang only a sandbox worker), ``Pipeline.prepare`` (localiser, ROIs); then one
``Pipeline.search`` over every ROI of the shard (encoder and FAISS batches) and
``Pipeline.assemble`` per input (eq. 4): the service's own three stages. An input that gives no
knee becomes a failure row with its reason (``FAILURE_REASONS``), never an exception; an error
of the pipeline itself (a broken bundle) still raises.

Row columns (``ROW_COLUMNS``): ``knee_id`` (``source#SIDE``), ``source``, ``side``,
``centre_x``/``centre_y`` (joint centre, source pixels), ``centre_source`` (``localiser``),
``confidence``, ``spacing_mm``, ``spacing_source``; per region ``<region>_neighbours`` (pair ids),
``<region>_similarities`` and ``<region>_weights`` (best first); per cartilage
``<c>_mean_mm``, ``<c>_medial_mm``, ``<c>_lateral_mm`` (synthesized thickness) and
``<c>_sd_mean_mm``, ``<c>_sd_medial_mm``, ``<c>_sd_lateral_mm`` (the neighbours' weighted SD,
the uncertainty); ``reliability_mm`` and ``calibration_group`` (the calibrated intervals' mean
width and the knee's calibration group, null when the index bundle is not calibrated:
``mris.calibration``); ``maps_shard`` and ``maps_index`` (where the knee's maps are, or null).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mris.batch.plan import MAP_LAYERS, Shard, shard_paths
from mris.constants import CARTILAGES
from mris.dicom import Radiograph
from mris.errors import (
    DecoderCrashed,
    DecodeTimeout,
    ImageTooLarge,
    KneeNotFound,
    MrisError,
    NoUsableSpacing,
    UnreadableDicom,
    UnsupportedDicom,
)
from mris.fsutil import atomic_save_npy, atomic_write

FAILURE_REASONS = {
    "unreadable-file": "the file could not be read from disk",
    "unreadable": "not a DICOM radiograph the decoder reads (corrupt or unsupported)",
    "too-large": "more pixels than the decode limits allow",
    "decode-timeout": "decoding took longer than the sandbox allows",
    "decoder-crashed": "the decoder crashed on the file (corrupt or hostile)",
    "no-spacing": "no usable pixel spacing",
    "knees-not-found": "the localiser did not find both knees",
    "error": "another error (its type and message are in detail)",
}
_PARTS = ("mean", "medial", "lateral")
SEARCH_BATCH = 64
"""ROIs per encoder batch and FAISS search (the service's micro-batch is at most this)."""

Decode = Callable[[str], Radiograph]


@dataclass(frozen=True)
class BatchSettings:
    """The synthesis options of a job (both knees of every radiograph)."""

    k: int
    nan_rule: str
    maps_dtype: str | None  # None: no maps written
    spacing_mm: float | None = None


@dataclass(frozen=True)
class ShardOutcome:
    shard: int
    knees: int
    failures: int
    inputs: int
    seconds: float


def failure_reason(exc: BaseException) -> str:
    """The ``FAILURE_REASONS`` key of an input's error."""
    for kinds, reason in (
        (DecoderCrashed, "decoder-crashed"),  # before UnreadableDicom, its base class
        (DecodeTimeout, "decode-timeout"),
        (ImageTooLarge, "too-large"),
        (NoUsableSpacing, "no-spacing"),
        (KneeNotFound, "knees-not-found"),
        ((UnreadableDicom, UnsupportedDicom), "unreadable"),
        (OSError, "unreadable-file"),
    ):
        if isinstance(exc, kinds):
            return reason
    return "error"


def _detail(exc: BaseException) -> str:
    text = exc.detail if isinstance(exc, MrisError) and hasattr(exc, "detail") else str(exc)
    text = text or type(exc).__name__
    if failure_reason(exc) == "error":
        text = f"{type(exc).__name__}: {text}"
    return text[:500]


@dataclass
class PreparedShard:
    """A shard's inputs decoded and their knees found (``prepare_shard``): each input's
    ``Prepared`` (None where it failed) and the failures' rows."""

    shard: Shard
    prepared: list
    failures: list[dict]
    started: float


def prepare_shard(
    pipeline,
    decode: Decode,
    shard: Shard,
    settings: BatchSettings,
    decode_threads: int = 1,
    on_input: Callable[[], None] | None = None,
) -> PreparedShard:
    """Stage 1 of a shard: decode each input and find its knees (``Pipeline.prepare``) in
    ``decode_threads`` threads; ``on_input()`` after each input (done or failed)."""
    from mris.options import RequestOptions

    started = time.perf_counter()
    options = RequestOptions(k=settings.k, nan_rule=settings.nan_rule)
    failures: list[dict] = []

    def prepare(position: int):
        path = shard.files[position]
        try:
            radiograph = decode(path)
            return pipeline.prepare(radiograph, options)
        except Exception as exc:  # noqa: BLE001 - every input's error becomes a failure row
            failures.append(
                {
                    "source": shard.sources[position],
                    "reason": failure_reason(exc),
                    "detail": _detail(exc),
                }
            )
            return None
        finally:
            if on_input is not None:
                on_input()

    with ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="mris-batch") as pool:
        prepared = list(pool.map(prepare, range(len(shard.files))))
    failures.sort(key=lambda failure: failure["source"])  # threads finish in any order
    return PreparedShard(shard, prepared, failures, started)


def finish_shard(
    pipeline, ready: PreparedShard, settings: BatchSettings, out: Path
) -> ShardOutcome:
    """Stage 2 of a shard: one ``Pipeline.search`` over all its ROIs (batches of
    ``SEARCH_BATCH``), ``Pipeline.assemble`` per input, then its maps, failures and rows written
    (rows last: they mark the shard complete)."""
    shard = ready.shard
    kept = [(i, p) for i, p in enumerate(ready.prepared) if p is not None]
    rois = [roi for _, p in kept for roi in p.rois]
    hits = []
    for start in range(0, len(rois), SEARCH_BATCH):
        hits.extend(pipeline.search(rois[start : start + SEARCH_BATCH], settings.k))

    rows: list[dict] = []
    maps: list[np.ndarray] = []
    position = 0
    for i, p in kept:
        knee_hits = hits[position : position + len(p.rois)]
        position += len(p.rois)
        for result in pipeline.assemble(p, knee_hits, settings.k, True, settings.nan_rule):
            maps_index = len(maps) if settings.maps_dtype else None
            rows.append(knee_row(shard, shard.sources[i], result, maps_index))
            if settings.maps_dtype:
                maps.append(np.stack([_layer(result, name) for name in MAP_LAYERS]))
    paths = shard_paths(out, shard)
    if settings.maps_dtype:
        shape = maps[0].shape if maps else (len(MAP_LAYERS), 0, 0)
        stacked = np.stack(maps) if maps else np.zeros((0, *shape), settings.maps_dtype)
        atomic_save_npy(paths["maps"], stacked.astype(settings.maps_dtype, copy=False))
    write_table(paths["failures"], ready.failures, failure_schema())
    write_table(paths["rows"], rows, row_schema(pipeline.regions))  # last: the shard is done
    return ShardOutcome(
        shard=shard.number,
        knees=len(rows),
        failures=len(ready.failures),
        inputs=len(shard.files),
        seconds=time.perf_counter() - ready.started,
    )


def run_shard(
    pipeline,
    decode: Decode,
    shard: Shard,
    settings: BatchSettings,
    out: Path,
    decode_threads: int = 1,
    on_input: Callable[[], None] | None = None,
) -> ShardOutcome:
    """Both stages of one shard (``prepare_shard``, then ``finish_shard``)."""
    ready = prepare_shard(pipeline, decode, shard, settings, decode_threads, on_input)
    return finish_shard(pipeline, ready, settings, out)


def _layer(result, name: str) -> np.ndarray:
    if name.endswith("_sd"):
        return result.std_mm[name[: -len("_sd")]]
    return result.maps_mm[name]


def knee_row(shard: Shard, source: str, result, maps_index: int | None) -> dict:
    """One knee's row (the module docstring's columns)."""
    from mris.dicom_out import compartment_means

    row = {
        "knee_id": f"{source}#{result.side}",
        "source": source,
        "side": result.side,
        "centre_x": float(result.roi.centre_xy[0]),
        "centre_y": float(result.roi.centre_xy[1]),
        "centre_source": result.roi.source,
        "confidence": result.confidence,
        "spacing_mm": float(result.roi.spacing_mm),
        "spacing_source": result.spacing_source,
    }
    for region, neighbours in result.neighbours.items():
        row[f"{region}_neighbours"] = [n.pair_id for n in neighbours]
        row[f"{region}_similarities"] = [float(n.similarity) for n in neighbours]
        row[f"{region}_weights"] = [float(n.weight) for n in neighbours]
    for name in CARTILAGES:
        thickness = compartment_means(result.maps_mm[name])
        spread = compartment_means(result.std_mm[name])
        for part in _PARTS:
            row[f"{name}_{part}_mm"] = thickness[part]
            row[f"{name}_sd_{part}_mm"] = spread[part]
    row["reliability_mm"] = result.reliability_mm  # None: the index is not calibrated
    row["calibration_group"] = result.calibration_group
    row["maps_shard"] = shard.name if maps_index is not None else None
    row["maps_index"] = maps_index
    return row


def row_schema(regions):
    """The rows' Arrow schema for a pipeline's regions (the module docstring's columns)."""
    import pyarrow as pa

    fields = [
        ("knee_id", pa.string()),
        ("source", pa.string()),
        ("side", pa.string()),
        ("centre_x", pa.float64()),
        ("centre_y", pa.float64()),
        ("centre_source", pa.string()),
        ("confidence", pa.float64()),
        ("spacing_mm", pa.float64()),
        ("spacing_source", pa.string()),
    ]
    for region in regions:
        fields += [
            (f"{region}_neighbours", pa.list_(pa.string())),
            (f"{region}_similarities", pa.list_(pa.float32())),
            (f"{region}_weights", pa.list_(pa.float32())),
        ]
    for name in CARTILAGES:
        for kind in ("", "sd_"):
            fields += [(f"{name}_{kind}{part}_mm", pa.float64()) for part in _PARTS]
    fields += [
        ("reliability_mm", pa.float64()),
        ("calibration_group", pa.string()),
        ("maps_shard", pa.string()),
        ("maps_index", pa.int64()),
    ]
    return pa.schema(fields)


def failure_schema():
    import pyarrow as pa

    return pa.schema([("source", pa.string()), ("reason", pa.string()), ("detail", pa.string())])


def write_table(path: Path, records: list[dict], schema) -> None:
    """``records`` as one Parquet file, atomically (an empty file with ``schema`` for none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(records, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


__all__ = [
    "BatchSettings",
    "FAILURE_REASONS",
    "PreparedShard",
    "ShardOutcome",
    "failure_reason",
    "failure_schema",
    "finish_shard",
    "knee_row",
    "prepare_shard",
    "row_schema",
    "run_shard",
    "write_table",
]
