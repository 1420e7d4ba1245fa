"""The index bundle: its card, its files, and loading it for search (the role of autofaiss's
``external/metadata.py`` plus the reader the service uses).

Layout of one version (immutable once written; see ``mris.index.publish``)::

    <version>/
      card.json                 IndexCard (format, encoder sha256s, variant, counts, checksums...)
      rows.csv                  row metadata: row, pair_id, subject_id, side, visit_month, klg, progressor
      embeddings-<region>.npy   float32 [rows, 512], L2-normalised (thickness encoder output)
      index-<region>.faiss      FAISS inner-product index over those embeddings, same row order
      maps-fc.npy, maps-tc.npy  float32 (or float16) [rows, H, W], mm, NaN outside cartilage

Regions are ``fc`` and ``tc`` (variant ``separate``) or ``combined``. Every region's index uses
the same row order, and the maps are stored once per cartilage: a ``separate`` bundle's ``fc``
neighbours synthesize ``maps-fc``, its ``tc`` neighbours ``maps-tc``; a ``combined`` bundle's
neighbours synthesize both (``RegionCard.maps``).

Maps are plain ``.npy`` (memory-mappable with ``np.load(mmap_mode="r")``). For search-time
reads ``MapStore.rows`` reads each needed row with one ``os.preadv`` (a cold random read of a
memory-mapped row costs ~8 ms here because of the 8 MiB readahead; an explicit read ~0.3 ms,
PERF_FACTS.md), or serves them from RAM with ``resident=True``.

Maps dtype: float32 by default. float16 halves the size; its step is 2**-8 mm (~0.004 mm) for
thickness in [4, 8) mm, so a stored value may be off by up to ~0.002 mm and a synthesis whose
neighbours all round the same way is off by as much — above the 1e-3 mm bound the issue sets
for thick cartilage (below 4 mm the error is <= 0.001 mm). Use float16 only where that is
acceptable; measured errors are in docs/INDEX.md.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from mris.constants import check_preprocessing_version
from mris.errors import BadParameter, BundleInvalid, BundleMismatch
from mris.model_bundle import ModelCard
from mris.synthesis import DEFAULT_NAN_RULE, NanRule, Synthesis, synthesize

INDEX_FORMAT = "mris-index/1"
CARD_NAME = "card.json"
ROWS_NAME = "rows.csv"
ROW_COLUMNS = ("row", "pair_id", "subject_id", "side", "visit_month", "klg", "progressor")
MAPS_DTYPES = ("float32", "float16")
CARTILAGES = ("fc", "tc")
REGION_MAPS = {"fc": ["fc"], "tc": ["tc"], "combined": ["fc", "tc"]}


def embeddings_name(region: str) -> str:
    return f"embeddings-{region}.npy"


def index_name(region: str) -> str:
    return f"index-{region}.faiss"


def maps_name(cartilage: str) -> str:
    return f"maps-{cartilage}.npy"


class RegionCard(BaseModel):
    """One region: its encoders (by sha256), its index and how well it retrieves."""

    thickness_encoder: str
    thickness_encoder_sha256: str
    radiograph_encoder: str
    radiograph_encoder_sha256: str
    embeddings_file: str
    index_file: str
    maps: list[str]  # cartilages this region's neighbours synthesize
    kind: str  # flat | ivf | ivfpq
    factory: str
    nlist: int = 0
    nprobe: int = 0
    exact: bool = True
    recall_at_20: float = 1.0  # measured against exact search at build time
    recall_queries: int = 0
    recall_method: str = ""
    reason: str = ""


class MapsCard(BaseModel):
    file: str
    shape: tuple[int, int, int]  # rows, H, W
    dtype: str


class IndexCard(BaseModel):
    format: str = INDEX_FORMAT
    version: str
    created: str  # ISO UTC
    build_seconds: float
    variant: str
    rows: int
    embedding_dim: int
    preprocess: dict[str, Any]
    # None on cards written before the version existed (ROI normalisation 1): refused by read_card.
    preprocessing_version: int | None = None
    preprocess_fingerprint: str
    regions: dict[str, RegionCard]
    maps: dict[str, MapsCard]
    source: dict[str, Any] = Field(default_factory=dict)  # manifest, splits, appended_from, skipped...
    versions: dict[str, str] = Field(default_factory=dict)  # faiss, onnxruntime, numpy, mris
    files: dict[str, str] = Field(default_factory=dict)  # name -> sha256
    sizes: dict[str, int] = Field(default_factory=dict)  # name -> bytes


def read_card(root: str | Path, *, check_preprocessing: bool = True) -> IndexCard:
    """The validated card of the bundle version at ``root``: ``BundleInvalid`` when missing or
    malformed, ``BundleMismatch`` when built with another ROI preprocessing version (rebuild it);
    ``check_preprocessing=False`` only for listing versions."""
    root = Path(root)
    path = root / CARD_NAME
    if not path.is_file():
        raise BundleInvalid(f"{root} is not an index bundle: {CARD_NAME} is missing")
    try:
        card = IndexCard.model_validate(json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise BundleInvalid(f"{path} is not a valid index card: {exc}") from exc
    if card.format != INDEX_FORMAT:
        raise BundleInvalid(f"{path}: unknown format {card.format!r} (expected {INDEX_FORMAT})")
    if check_preprocessing:
        check_preprocessing_version(
            card.preprocessing_version, f"index bundle {root}",
            "rebuilt with a current model bundle (`mris index build ...`)",
        )
    return card


def check_encoders(card: IndexCard, model_card: ModelCard) -> None:
    """Raise ``BundleMismatch`` unless ``model_card``'s encoders (both modalities, every region)
    and preprocessing are the ones the index was built with."""
    variant = model_card.variants.get(card.variant)
    if variant is None:
        raise BundleMismatch(f"index bundle {card.version} is variant '{card.variant}', the model bundle has no such variant")
    problems = []
    for region, region_card in card.regions.items():
        if region not in variant.regions:
            problems.append(f"region {region} missing from the model")
            continue
        for modality in ("thickness", "radiograph"):
            have = model_card.encoder_sha256(card.variant, region, modality)
            want = getattr(region_card, f"{modality}_encoder_sha256")
            if have != want:
                problems.append(f"{region} {modality} encoder sha256 {have[:12]} != index's {want[:12]}")
    if model_card.preprocess != card.preprocess:
        problems.append("preprocessing constants differ")
    if problems:
        raise BundleMismatch(
            f"index bundle {card.version} was not built with these encoders: " + "; ".join(problems)
        )


# ---------------------------------------------------------------------------------------------
# Row metadata


@dataclass(frozen=True)
class RowMeta:
    row: int
    pair_id: str
    subject_id: str
    side: str
    visit_month: int
    klg: int | None
    progressor: int | None

    def to_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in ROW_COLUMNS}


def _opt_int(text: str) -> int | None:
    return None if text in ("", None) else int(text)


def write_rows(path: Path, rows: Sequence[RowMeta]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(ROW_COLUMNS)
        for meta in rows:
            writer.writerow(["" if getattr(meta, c) is None else getattr(meta, c) for c in ROW_COLUMNS])


def read_rows(path: Path) -> list[RowMeta]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [
            RowMeta(
                row=int(r["row"]),
                pair_id=r["pair_id"],
                subject_id=r["subject_id"],
                side=r["side"],
                visit_month=int(r["visit_month"]),
                klg=_opt_int(r["klg"]),
                progressor=_opt_int(r["progressor"]),
            )
            for r in csv.DictReader(handle)
        ]


# ---------------------------------------------------------------------------------------------
# Maps: written row by row during a build, read by explicit row reads at search time


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
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(len(kept), *self.shape))
            for start in range(0, len(kept), 1024):
                out[start : start + 1024] = self.array[kept[start : start + 1024]]
            out.flush()
            del out
            self.array = None
            os.replace(tmp, self.path)
            return (len(kept), *self.shape)
        shape = self.array.shape
        self.array = None
        return tuple(int(s) for s in shape)  # type: ignore[return-value]


class MapStore:
    """Read access to one ``maps-<cartilage>.npy``.

    ``rows(ids)`` returns float32 ``[*ids.shape, H, W]`` (NaN maps for id -1). With
    ``resident=True`` the whole array is loaded into RAM once; otherwise each needed row is read
    with ``os.preadv`` (fast cold, no readahead waste). ``array`` is the memory-mapped view.
    """

    def __init__(self, path: Path, resident: bool = False):
        self.path = path
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
            self.offset = handle.tell()
        if fortran or len(shape) != 3:
            raise BundleInvalid(f"{path.name}: expected a C-ordered [rows, H, W] array, got {shape}")
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        self.array = np.load(path, mmap_mode="r")
        self.resident: np.ndarray | None = np.array(self.array) if resident else None
        self._fd = os.open(path, os.O_RDONLY)
        self._lock = threading.Lock()

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
        flat = ids.reshape(-1)
        h, w = self.shape[1], self.shape[2]
        out = np.empty((flat.size, h, w), dtype=self.dtype)
        if self.resident is not None:
            valid = flat >= 0
            out[valid] = self.resident[flat[valid]]
            out[~valid] = np.nan
        else:
            for slot, row in enumerate(flat):
                if row < 0:
                    out[slot] = np.nan
                    continue
                if row >= self.shape[0]:
                    raise IndexError(f"row {row} out of range ({self.shape[0]} rows)")
                got = os.preadv(self._fd, [memoryview(out[slot]).cast("B")], self.offset + int(row) * self.row_bytes)
                if got != self.row_bytes:
                    raise BundleInvalid(f"{self.path.name}: short read at row {row}")
        return out.astype(np.float32, copy=False).reshape(*ids.shape, h, w)


# ---------------------------------------------------------------------------------------------
# Loading for search


def _read_faiss(path: Path, mmap: bool):
    import faiss

    if mmap:
        for flag in (getattr(faiss, "IO_FLAG_MMAP_IFC", None), getattr(faiss, "IO_FLAG_MMAP", None)):
            if flag is None:
                continue
            try:
                return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY), True
            except RuntimeError:
                continue
    return faiss.read_index(str(path)), False


def gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover
        return False


class IndexBundle:
    """A loaded index bundle: FAISS indexes per region, maps per cartilage, row metadata.

    What the service calls:

    - ``search(region, queries [N, 512] float32, k) -> (similarities [N, k] float32,
      row_ids [N, k] int64)``, best first; k is capped at the row count.
    - ``neighbour_maps(cartilage, row_ids [N, k]) -> float32 [N, k, H, W]``.
    - ``synthesize(region, queries, k) -> {cartilage: Synthesis}`` (search + eq. 4).
    - ``rows[i]`` / ``row_metadata(ids)``: pair_id, subject_id, side, visit_month, klg.
    """

    def __init__(
        self,
        root: Path,
        card: IndexCard,
        device: str = "cpu",
        fp16: bool = False,
        mmap_index: bool = True,
        resident_maps: bool = False,
    ):
        self.root = root
        self.card = card
        self.rows = read_rows(root / ROWS_NAME)
        if len(self.rows) != card.rows:
            raise BundleInvalid(f"index bundle {root}: rows.csv has {len(self.rows)} rows, card says {card.rows}")
        self.device = "cuda" if device in ("auto", "cuda") and gpu_available() else "cpu"
        if device == "cuda" and self.device != "cuda":
            raise BadParameter("device 'cuda' asked but FAISS sees no GPU (install faiss-gpu)")
        self.indexes: dict[str, Any] = {}
        self.mmapped: dict[str, bool] = {}
        self._gpu_resources = None
        for region, region_card in card.regions.items():
            index, mmapped = _read_faiss(root / region_card.index_file, mmap_index and self.device == "cpu")
            if index.ntotal != card.rows:
                raise BundleInvalid(f"{region_card.index_file} holds {index.ntotal} vectors, card says {card.rows}")
            if region_card.nprobe:
                import faiss

                faiss.extract_index_ivf(index).nprobe = region_card.nprobe
            if self.device == "cuda":
                index = self._to_gpu(index, fp16)
            self.indexes[region] = index
            self.mmapped[region] = mmapped
        self.maps = {c: MapStore(root / m.file, resident=resident_maps) for c, m in card.maps.items()}

    def _to_gpu(self, index, fp16: bool):  # pragma: no cover - needs a GPU (untested here)
        import faiss

        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = fp16
        return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index, options)

    @property
    def regions(self) -> list[str]:
        return list(self.card.regions)

    def cartilages(self, region: str) -> list[str]:
        return list(self.card.regions[region].maps)

    def search(self, region: str, queries: np.ndarray, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        if region not in self.indexes:
            raise BadParameter(f"region must be one of {', '.join(self.indexes)}, got {region!r}")
        if k < 1:
            raise BadParameter(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.card.embedding_dim:
            raise BadParameter(f"queries must be [N, {self.card.embedding_dim}], got {queries.shape}")
        k = min(k, self.card.rows)
        similarities, ids = self.indexes[region].search(queries, k)
        return similarities.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def neighbour_maps(self, cartilage: str, row_ids: np.ndarray) -> np.ndarray:
        return self.maps[cartilage].rows(row_ids)

    def synthesize(self, region: str, queries: np.ndarray, k: int = 20, min_cartilage_share: float = 0.5,
                   nan_rule: NanRule = DEFAULT_NAN_RULE) -> dict[str, Synthesis]:
        similarities, ids = self.search(region, queries, k)
        return {
            cartilage: synthesize(self.neighbour_maps(cartilage, ids), similarities, min_cartilage_share, nan_rule)
            for cartilage in self.cartilages(region)
        }

    def row_metadata(self, row_ids: Sequence[int]) -> list[dict[str, Any] | None]:
        return [self.rows[int(i)].to_dict() if i >= 0 else None for i in row_ids]

    def embeddings(self, region: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.root / self.card.regions[region].embeddings_file, mmap_mode="r" if mmap else None)

    def close(self) -> None:
        for store in self.maps.values():
            store.close()


def load_index_bundle(
    path: str | Path,
    model_card: ModelCard | None = None,
    *,
    device: str = "cpu",
    fp16: bool = False,
    mmap_index: bool = True,
    resident_maps: bool = False,
    check_sizes: bool = True,
) -> IndexBundle:
    """Load a bundle for search. ``path`` is a version folder, a ``current`` link or an index
    root (its ``current``). With ``model_card``, refuse (``BundleMismatch``) a bundle built with
    other encoders. ``check_sizes`` compares every file's size with the card (cheap); full
    checksums are ``mris index verify``'s job. ``device`` auto|cpu|cuda: the FAISS GPU index
    when a GPU is present (``fp16`` stores its vectors in float16)."""
    from mris.index.publish import resolve

    root = resolve(path)
    card = read_card(root)
    if model_card is not None:
        check_encoders(card, model_card)
    if check_sizes:
        for name, size in card.sizes.items():
            file = root / name
            if not file.is_file():
                raise BundleInvalid(f"index bundle {root} is incomplete: {name} is missing")
            if file.stat().st_size != size:
                raise BundleInvalid(f"index bundle {root}: {name} has {file.stat().st_size} bytes, card says {size}")
    return IndexBundle(root, card, device=device, fp16=fp16, mmap_index=mmap_index, resident_maps=resident_maps)
