"""A loaded index bundle for search: the card (``card``), the rows table (``rows``), the maps
(``maps``) and one FAISS index per region (``faiss_io``), composed by ``load_index_bundle``.

The names of those modules are re-exported here, so ``from mris.index.bundle import ...``
keeps working for the card, rows and maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mris.calibration import Calibration
from mris.errors import BadParameter
from mris.index.card import (
    CARD_NAME,
    INDEX_FORMAT,
    REGION_MAPS,
    IndexCard,
    MapsCard,
    RegionCard,
    check_encoders,
    embeddings_name,
    index_name,
    maps_name,
    read_card,
)
from mris.index.card import check_sizes as check_file_sizes
from mris.index.faiss_io import GpuCloner, gpu_available, load_search_index, search_device
from mris.index.maps import MAPS_DTYPES, MapStore, MapsWriter
from mris.index.rows import ROW_COLUMNS, ROWS_NAME, RowMeta, RowsTable, read_rows, write_rows
from mris.model_bundle import ModelCard
from mris.npyio import load_npy
from mris.synthesis import DEFAULT_MIN_CARTILAGE_SHARE, DEFAULT_NAN_RULE, NanRule, Synthesis


class IndexBundle:
    """A loaded index bundle: FAISS indexes per region, maps per cartilage, row metadata.

    What the pipeline calls:

    - ``search(region, queries [N, 512] float32, k) -> (similarities [N, k] float32,
      row_ids [N, k] int64)``, best first; k is capped at the row count.
    - ``neighbour_maps(cartilage, row_ids [N, k]) -> float32 [N, k, H, W]``.
    - ``synthesize_neighbours(cartilage, row_ids [N, k], similarities [N, k], nan_rule) ->
      mris.synthesis.Synthesis``: eq. 4 over those rows, read in place from the maps
      (``MapStore.synthesize``); ``mris.pipeline.synthesize_maps`` calls it.
    - ``rows[i]`` / ``row_metadata(ids)``: pair_id, subject_id, side, visit_month, klg.
    - ``calibration``: the bundle's ``mris.calibration.Calibration`` (``mris index
      calibrate``), or None: its intervals are then not served.
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
        self.rows = RowsTable.read(root, card.rows)
        self.device = search_device(device)
        gpu = GpuCloner(fp16) if self.device == "cuda" else None
        self.indexes: dict[str, Any] = {}
        self.mmapped: dict[str, bool] = {}
        for region, region_card in card.regions.items():
            self.indexes[region], self.mmapped[region] = load_search_index(
                root / region_card.index_file,
                card.rows,
                region_card.nprobe,
                mmap=mmap_index,
                gpu=gpu,
            )
        self.maps = {
            c: MapStore(root / m.file, resident=resident_maps, shape=m.shape, dtype=m.dtype)
            for c, m in card.maps.items()
        }
        # The interval calibration (mris.calibration) when the card names one, else None.
        self.calibration: Calibration | None = None
        if card.calibration is not None:
            self.calibration = Calibration.read(root / card.calibration["file"])

    @property
    def regions(self) -> list[str]:
        return list(self.card.regions)

    def cartilages(self, region: str) -> list[str]:
        return list(self.card.regions[region].maps)

    def search(
        self, region: str, queries: np.ndarray, k: int = 20
    ) -> tuple[np.ndarray, np.ndarray]:
        if region not in self.indexes:
            raise BadParameter(f"region must be one of {', '.join(self.indexes)}, got {region!r}")
        if k < 1:
            raise BadParameter(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.card.embedding_dim:
            raise BadParameter(
                f"queries must be [N, {self.card.embedding_dim}], got {queries.shape}"
            )
        k = min(k, self.card.rows)
        similarities, ids = self.indexes[region].search(queries, k)
        return similarities.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def neighbour_maps(self, cartilage: str, row_ids: np.ndarray) -> np.ndarray:
        return self.maps[cartilage].rows(row_ids)

    def synthesize_neighbours(
        self,
        cartilage: str,
        row_ids: np.ndarray,
        similarities: np.ndarray,
        nan_rule: NanRule = DEFAULT_NAN_RULE,
        min_cartilage_share: float = DEFAULT_MIN_CARTILAGE_SHARE,
    ) -> Synthesis:
        return self.maps[cartilage].synthesize(row_ids, similarities, min_cartilage_share, nan_rule)

    def row_metadata(self, row_ids) -> list[dict[str, Any] | None]:
        return self.rows.metadata(row_ids)

    def embeddings(self, region: str, mmap: bool = True) -> np.ndarray:
        return load_npy(
            self.root / self.card.regions[region].embeddings_file,
            mmap_mode="r" if mmap else None,
        )

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
        check_file_sizes(root, card)
    return IndexBundle(
        root, card, device=device, fp16=fp16, mmap_index=mmap_index, resident_maps=resident_maps
    )


__all__ = [
    "CARD_NAME",
    "INDEX_FORMAT",
    "MAPS_DTYPES",
    "REGION_MAPS",
    "ROWS_NAME",
    "ROW_COLUMNS",
    "IndexBundle",
    "IndexCard",
    "MapStore",
    "MapsCard",
    "MapsWriter",
    "RegionCard",
    "RowMeta",
    "RowsTable",
    "check_encoders",
    "embeddings_name",
    "gpu_available",
    "index_name",
    "load_index_bundle",
    "maps_name",
    "read_card",
    "read_rows",
    "write_rows",
]
