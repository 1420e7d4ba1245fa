"""The bundle's thickness maps: ``MapsWriter`` writes them row by row during a build,
``MapStore`` reads the rows a search needs.

One ``maps-<cartilage>.npy`` per cartilage, float32 (or float16) ``[rows, H, W]`` in mm, NaN
outside cartilage, in the bundle's row order. Plain ``.npy`` (memory-mappable with
``np.load(mmap_mode="r")``). For search-time reads ``MapStore.rows`` reads each needed row with
one ``os.preadv`` (a cold random read of a memory-mapped row costs ~8 ms here because of the
8 MiB readahead; an explicit read ~0.3 ms, PERF_FACTS.md), or serves them from RAM with
``resident=True``. ``MapStore.synthesize`` is eq. 4 over the rows a search found
(``mris.synthesis.synthesize_rows``): resident maps are read in place, without a gathered copy.

Maps dtype: float32 by default. float16 halves the size; its step is 2**-8 mm (~0.004 mm) for
thickness in [4, 8) mm, so a stored value may be off by up to ~0.002 mm and a synthesis whose
neighbours all round the same way is off by as much — above the 1e-3 mm bound the issue sets
for thick cartilage (below 4 mm the error is <= 0.001 mm). Use float16 only where that is
acceptable; measured errors are in docs/INDEX.md.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mris.errors import BadParameter, BundleInvalid
from mris.npyio import load_npy, read_npy_header
from mris.synthesis import (
    DEFAULT_MIN_CARTILAGE_SHARE,
    DEFAULT_NAN_RULE,
    NanRule,
    Synthesis,
    synthesize_rows,
    warm_up,
)

MAPS_DTYPES = ("float32", "float16")
COPY_ROWS = 1024  # rows per chunk when maps are compacted or concatenated


class MapsWriter:
    """Writes ``maps-<cartilage>.npy`` [capacity, H, W] in place (``open_memmap``); the shape
    is fixed by the first map. ``finish(keep)`` drops skipped rows (rewriting only if needed)."""

    def __init__(self, path: Path, capacity: int, dtype: str):
        if dtype not in MAPS_DTYPES:
            raise BadParameter(f"maps dtype must be one of {', '.join(MAPS_DTYPES)}, got {dtype!r}")
        self.path = path
        self.capacity = capacity
        self.dtype = np.dtype(dtype)
        self.array: np.memmap | None = None
        self.shape: tuple[int, int] | None = None

    def open(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.array = np.lib.format.open_memmap(
            self.path, mode="w+", dtype=self.dtype, shape=(self.capacity, *self.shape)
        )

    def write(self, row: int, thickness_mm: np.ndarray) -> None:
        if self.array is None:
            self.open(thickness_mm.shape)
        self.array[row] = thickness_mm

    def write_block(self, start: int, block: np.ndarray) -> None:
        if self.array is None:
            self.open(block.shape[1:])
        self.array[start : start + len(block)] = block

    def finish(self, keep: np.ndarray | None = None) -> tuple[int, int, int]:
        """Flush; with ``keep`` (bool [capacity]) compact to the kept rows. Returns the shape."""
        if self.array is None:
            raise BundleInvalid(f"no map was written to {self.path.name}")
        self.array.flush()
        if keep is not None and not keep.all():
            kept = np.flatnonzero(keep)
            tmp = self.path.with_name(self.path.name + ".compact.npy")
            out = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=self.dtype, shape=(len(kept), *self.shape)
            )
            for start in range(0, len(kept), COPY_ROWS):
                out[start : start + COPY_ROWS] = self.array[kept[start : start + COPY_ROWS]]
            out.flush()
            del out
            self.array = None
            os.replace(tmp, self.path)
            return (len(kept), *self.shape)
        shape = self.array.shape
        self.array = None
        return tuple(int(s) for s in shape)  # type: ignore[return-value]


def prepend_maps(base_file: Path, new_file: Path) -> tuple[int, int, int]:
    """Rewrite ``new_file`` as ``base_file``'s rows followed by its own rows (chunked copy, for
    an appended build). Returns the new shape."""
    base = load_npy(base_file, mmap_mode="r")
    new = load_npy(new_file, mmap_mode="r")
    tmp = new_file.with_name(new_file.name + ".append.npy")
    out = np.lib.format.open_memmap(
        tmp, mode="w+", dtype=base.dtype, shape=(len(base) + len(new), *base.shape[1:])
    )
    for start in range(0, len(base), COPY_ROWS):
        chunk = base[start : start + COPY_ROWS]
        out[start : start + len(chunk)] = chunk
    for start in range(0, len(new), COPY_ROWS):
        chunk = new[start : start + COPY_ROWS]
        out[len(base) + start : len(base) + start + len(chunk)] = chunk
    out.flush()
    shape = tuple(int(s) for s in out.shape)
    del out, base, new
    os.replace(tmp, new_file)
    return shape  # type: ignore[return-value]


def _read_header(path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of an ``.npy`` file; ``BundleInvalid`` when
    it is not one."""
    try:
        with open(path, "rb") as handle:
            shape, fortran, dtype = read_npy_header(handle)
            return shape, fortran, dtype, handle.tell()
    except ValueError as exc:
        raise BundleInvalid(f"{path.name} is not a readable .npy array: {exc}") from exc


class MapStore:
    """Read access to one ``maps-<cartilage>.npy``.

    ``rows(ids)`` returns float32 ``[*ids.shape, H, W]`` (NaN maps for id -1).
    ``synthesize(ids [N, k], similarities [N, k], ...)`` returns eq. 4 over those rows, a
    ``mris.synthesis.Synthesis``. With ``resident=True`` the whole array is loaded into RAM once
    (and the synthesis kernel compiled, or loaded from numba's cache, for its dtype, so the first
    query does not wait for it); otherwise each needed row is read with ``os.preadv`` (fast cold,
    no readahead waste). ``array`` is the memory-mapped view. ``shape`` / ``dtype``, when given
    (the card's), are checked against the file's header (``BundleInvalid``), as is a data
    section shorter than the header says.
    """

    def __init__(
        self,
        path: Path,
        resident: bool = False,
        *,
        shape: tuple[int, int, int] | None = None,
        dtype: str | None = None,
    ):
        self.path = path
        header_shape, fortran, header_dtype, self.offset = _read_header(path)
        if fortran or len(header_shape) != 3:
            raise BundleInvalid(
                f"{path.name}: expected a C-ordered [rows, H, W] array, got {header_shape}"
            )
        self.shape = tuple(int(s) for s in header_shape)
        self.dtype = np.dtype(header_dtype)
        if shape is not None and tuple(shape) != self.shape:
            raise BundleInvalid(f"{path.name} is {self.shape}, the card says {tuple(shape)}")
        if dtype is not None and np.dtype(dtype) != self.dtype:
            raise BundleInvalid(f"{path.name} is {self.dtype}, the card says {dtype}")
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        if path.stat().st_size < self.offset + self.shape[0] * self.row_bytes:
            raise BundleInvalid(f"{path.name} is truncated: shorter than its {self.shape} header")
        self.array = load_npy(path, mmap_mode="r")
        self.resident: np.ndarray | None = np.array(self.array) if resident else None
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()
        if resident:
            warm_up(self.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        h, w = self.shape[1], self.shape[2]
        if self.resident is not None:
            flat = ids.reshape(-1)
            out = np.empty((flat.size, h, w), dtype=self.dtype)
            valid = flat >= 0
            out[valid] = self.resident[flat[valid]]
            out[~valid] = np.nan
        else:
            out = self._read(ids.reshape(-1))
        return out.astype(np.float32, copy=False).reshape(*ids.shape, h, w)

    def synthesize(
        self,
        ids: np.ndarray,
        similarities: np.ndarray,
        min_cartilage_share: float = DEFAULT_MIN_CARTILAGE_SHARE,
        nan_rule: NanRule = DEFAULT_NAN_RULE,
    ) -> Synthesis:
        """Eq. 4 over rows ``ids`` int [N, k] (-1: no neighbour) with ``similarities`` [N, k]:
        ``synthesize(self.rows(ids), similarities, ...)``, computed by
        ``mris.synthesis.synthesize_rows`` on the resident array in place, or on the rows read
        with ``os.preadv`` in the stored dtype (no float32 copy)."""
        if self.resident is not None:
            return synthesize_rows(self.resident, ids, similarities, min_cartilage_share, nan_rule)
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        local = np.where(flat >= 0, np.arange(flat.size), -1).reshape(ids.shape)
        return synthesize_rows(self._read(flat), local, similarities, min_cartilage_share, nan_rule)

    def _read(self, flat: np.ndarray) -> np.ndarray:
        """Rows ``flat`` int64 [n] -> [n, H, W] in the stored dtype, one ``os.preadv`` each
        (NaN maps for id -1)."""
        out = np.empty((flat.size, self.shape[1], self.shape[2]), dtype=self.dtype)
        for slot, row in enumerate(flat):
            if row < 0:
                out[slot] = np.nan
                continue
            if row >= self.shape[0]:
                raise IndexError(f"row {row} out of range ({self.shape[0]} rows)")
            got = os.preadv(
                self._fd,
                [memoryview(out[slot]).cast("B")],
                self.offset + int(row) * self.row_bytes,
            )
            if got != self.row_bytes:
                raise BundleInvalid(f"{self.path.name}: short read at row {row}")
        return out


__all__ = ["MAPS_DTYPES", "MapStore", "MapsWriter", "prepend_maps"]
