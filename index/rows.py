"""The bundle's row table (``rows.csv``): which knee-visit pair each FAISS row id is.

Row ``i`` of every region's index, embeddings and maps is line ``i`` of ``rows.csv``
(columns ``ROW_COLUMNS``; ``klg`` and ``progressor`` are empty when unknown). ``RowsTable`` is
the loaded table a search result's row ids are looked up in.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from mris.errors import BundleInvalid

ROWS_NAME = "rows.csv"
ROW_COLUMNS = ("row", "pair_id", "subject_id", "side", "visit_month", "klg", "progressor")


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
            writer.writerow(
                ["" if getattr(meta, c) is None else getattr(meta, c) for c in ROW_COLUMNS]
            )


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


class RowsTable(Sequence):
    """The rows of one bundle version, indexed by FAISS row id (``table[i]`` -> ``RowMeta``)."""

    def __init__(self, rows: Sequence[RowMeta]):
        self._rows = list(rows)
        self._by_pair: dict[str, int] | None = None

    @classmethod
    def read(cls, root: Path, expected_rows: int) -> RowsTable:
        """``root/rows.csv``; ``BundleInvalid`` unless it holds ``expected_rows`` rows (the
        card's count)."""
        table = cls(read_rows(root / ROWS_NAME))
        if len(table) != expected_rows:
            raise BundleInvalid(
                f"index bundle {root}: rows.csv has {len(table)} rows, card says {expected_rows}"
            )
        return table

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, index: int) -> RowMeta: ...

    @overload
    def __getitem__(self, index: slice) -> list[RowMeta]: ...

    def __getitem__(self, index):
        return self._rows[index]

    def __iter__(self) -> Iterator[RowMeta]:
        return iter(self._rows)

    def metadata(self, row_ids: Sequence[int]) -> list[dict[str, Any] | None]:
        """One dict per row id (``RowMeta.to_dict``); ``None`` for -1 (no neighbour)."""
        return [self._rows[int(i)].to_dict() if i >= 0 else None for i in row_ids]

    def row_of(self, pair_id: str) -> int:
        """The row id of ``pair_id``; ``KeyError`` when the bundle does not hold it."""
        if self._by_pair is None:
            self._by_pair = {meta.pair_id: i for i, meta in enumerate(self._rows)}
        return self._by_pair[pair_id]


__all__ = ["ROWS_NAME", "ROW_COLUMNS", "RowMeta", "RowsTable", "read_rows", "write_rows"]
