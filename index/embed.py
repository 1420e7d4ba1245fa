"""Stream manifest rows -> thickness maps -> encoder inputs -> embeddings (autofaiss's
``readers/`` role, plus the encoder).

Decoding and preprocessing run in a thread pool (``np.load`` and the resize release the GIL for
most of their time) while the calling thread runs the ONNX thickness encoder on the batch before:
with ``prefetch`` batches in flight the encoder rarely waits. Each row's raw maps (mm) are handed
to ``on_maps`` so the build writes the bundle's map arrays in the same pass.

A map that cannot be used (missing, unreadable, not 2-D float, all NaN: ``InvalidThicknessMap``),
or whose shape differs from the first map's, stops the stream with a clear error, or with
``skip_bad`` is skipped and counted by reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mris.constants import PreprocessConfig
from mris.encoders import OnnxEncoder
from mris.errors import InvalidThicknessMap, ManifestError, MrisError
from mris.manifest import Manifest, ManifestRow
from mris.thickness import combined_input, load_thickness_map, map_to_input

SKIP_REASONS = ("missing", "unreadable", "all_nan", "wrong_shape")


@dataclass
class EmbeddedRows:
    """The result of a stream over ``n`` candidate rows.

    - ``keep``: bool [n], False for skipped rows.
    - ``embeddings``: region -> float32 [n, D] (rows of skipped entries are zero).
    - ``skipped``: reason -> pair_ids.
    - ``map_shape``: (H, W) of every map.
    """

    keep: np.ndarray
    embeddings: dict[str, np.ndarray]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    map_shape: tuple[int, int] | None = None
    seconds: float = 0.0


def find_missing(manifest: Manifest, rows: Sequence[ManifestRow]) -> list[tuple[str, str]]:
    """(pair_id, path) of every map file that does not exist (a cheap check before any work)."""
    missing = []
    for row in rows:
        for path in (row.fc_path, row.tc_path):
            if not manifest.resolve_path(path).exists():
                missing.append((row.pair_id, str(path)))
    return missing


def _classify(exc: InvalidThicknessMap) -> str:
    text = exc.detail
    if "does not exist" in text:
        return "missing"
    if "NaN everywhere" in text:
        return "all_nan"
    return "unreadable"


def region_inputs(
    variant: str, fc_mm: np.ndarray, tc_mm: np.ndarray, config: PreprocessConfig
) -> dict[str, np.ndarray]:
    """The thickness-encoder input per region (float32 2-D) for one knee-visit."""
    if variant == "combined":
        return {"combined": combined_input(fc_mm, tc_mm, config)}
    return {"fc": map_to_input(fc_mm, config), "tc": map_to_input(tc_mm, config)}


@dataclass
class _Loaded:
    index: int
    fc: np.ndarray | None = None
    tc: np.ndarray | None = None
    inputs: dict[str, np.ndarray] | None = None
    error: str | None = None
    reason: str | None = None


def _load_row(
    manifest: Manifest, row: ManifestRow, index: int, variant: str, config: PreprocessConfig
) -> _Loaded:
    try:
        fc = load_thickness_map(manifest.resolve_path(row.fc_path))
        tc = load_thickness_map(manifest.resolve_path(row.tc_path))
    except InvalidThicknessMap as exc:
        return _Loaded(index, error=f"{row.pair_id}: {exc.detail}", reason=_classify(exc))
    return _Loaded(index, fc=fc, tc=tc, inputs=region_inputs(variant, fc, tc, config))


def admit(
    item: _Loaded,
    rows: Sequence[ManifestRow],
    map_shape: tuple[int, int] | None,
    skip_bad: bool,
    keep: np.ndarray,
    skipped: dict[str, list[str]],
) -> tuple[int, int] | None:
    """Decide one loaded row, in row order: the first usable map sets the shape every other map
    must have; an unusable row stops the stream (``MrisError``) or, with ``skip_bad``, is marked
    in ``keep`` and counted in ``skipped`` (``item.error`` set). Returns the shape so far."""
    if item.error is None and map_shape is None:
        map_shape = item.fc.shape
    if item.error is None and (item.fc.shape != map_shape or item.tc.shape != map_shape):
        item.error = (
            f"{rows[item.index].pair_id}: maps are {item.fc.shape} / {item.tc.shape}, "
            f"the others {map_shape}"
        )
        item.reason = "wrong_shape"
    if item.error is not None:
        if not skip_bad:
            raise MrisError(
                f"unusable thickness map: {item.error} (or pass --skip-missing to skip it)"
            )
        keep[item.index] = False
        skipped.setdefault(item.reason or "unreadable", []).append(rows[item.index].pair_id)
    return map_shape


def embed_rows(
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    encoders: dict[str, OnnxEncoder],
    variant: str,
    config: PreprocessConfig,
    on_maps: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    skip_bad: bool = False,
    batch_size: int = 16,
    workers: int = 2,
    prefetch: int = 3,
    on_progress: Callable[[int], None] | None = None,
) -> EmbeddedRows:
    """Embed every row's maps with each region's thickness encoder.

    ``on_maps(i, fc_mm, tc_mm)`` is called in row order for every kept row ``i``.
    ``on_progress(n)`` after each batch with the rows done in it.
    """
    import time

    if not rows:
        raise ManifestError("no rows to embed")
    start_time = time.perf_counter()
    n = len(rows)
    dims = {region: encoder.embedding_dim or 512 for region, encoder in encoders.items()}
    embeddings = {region: np.zeros((n, dim), np.float32) for region, dim in dims.items()}
    keep = np.ones(n, bool)
    skipped: dict[str, list[str]] = {}
    map_shape: tuple[int, int] | None = None

    def load_batch(start: int) -> list[_Loaded]:
        return [
            _load_row(manifest, rows[i], i, variant, config)
            for i in range(start, min(n, start + batch_size))
        ]

    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mris-embed") as pool:
        pending: deque = deque()
        next_start = 0
        try:
            while next_start < len(starts) and len(pending) < prefetch:
                pending.append(pool.submit(load_batch, starts[next_start]))
                next_start += 1
            while pending:
                loaded = pending.popleft().result()
                if next_start < len(starts):
                    pending.append(pool.submit(load_batch, starts[next_start]))
                    next_start += 1
                good: list[_Loaded] = []
                for item in loaded:
                    map_shape = admit(item, rows, map_shape, skip_bad, keep, skipped)
                    if item.error is not None:
                        continue
                    good.append(item)
                    if on_maps is not None:
                        on_maps(item.index, item.fc, item.tc)
                if good:
                    positions = np.array([item.index for item in good])
                    for region, encoder in encoders.items():
                        batch = np.stack([item.inputs[region] for item in good])[:, None]
                        embeddings[region][positions] = encoder.embed(batch)
                if on_progress is not None:
                    on_progress(len(loaded))
        except BaseException:
            for future in pending:
                future.cancel()
            raise
    return EmbeddedRows(
        keep=keep,
        embeddings=embeddings,
        skipped=skipped,
        map_shape=map_shape,
        seconds=time.perf_counter() - start_time,
    )
