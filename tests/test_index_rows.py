"""mris.index.rows: rows.csv round trip, the RowsTable lookups and a count that disagrees."""

from __future__ import annotations

import pytest

from mris.errors import BundleInvalid
from mris.index.rows import ROW_COLUMNS, ROWS_NAME, RowMeta, RowsTable, read_rows, write_rows

ROWS = [
    RowMeta(0, "S1-L-00", "S1", "LEFT", 0, 2, 0),
    RowMeta(1, "S1-R-12", "S1", "RIGHT", 12, None, None),  # unknown grade and progression
    RowMeta(2, "S2-L-00", "S2", "LEFT", 0, 4, 1),
]


def test_rows_round_trip(tmp_path):
    write_rows(tmp_path / ROWS_NAME, ROWS)
    header = (tmp_path / ROWS_NAME).read_text().splitlines()[0]
    assert header == ",".join(ROW_COLUMNS)
    assert read_rows(tmp_path / ROWS_NAME) == ROWS


def test_table_lookups(tmp_path):
    write_rows(tmp_path / ROWS_NAME, ROWS)
    table = RowsTable.read(tmp_path, expected_rows=3)
    assert len(table) == 3 and list(table) == ROWS and table[1] == ROWS[1]
    assert table[1:] == ROWS[1:]
    assert table.metadata([2, -1, 0]) == [ROWS[2].to_dict(), None, ROWS[0].to_dict()]
    assert table.metadata([1])[0]["klg"] is None
    assert table.row_of("S2-L-00") == 2
    with pytest.raises(KeyError):
        table.row_of("S9-L-00")


def test_table_refuses_a_count_the_card_does_not_say(tmp_path):
    write_rows(tmp_path / ROWS_NAME, ROWS)
    with pytest.raises(BundleInvalid, match="3 rows, card says 4"):
        RowsTable.read(tmp_path, expected_rows=4)
