"""The manifest: one row per knee-visit pair (DESIGN.md, Data contracts).

CSV (or Parquet when pyarrow is installed). Paths in the manifest are relative to the
manifest's own folder unless absolute; ``resolve_path`` turns them into real paths. Columns
beyond the DESIGN ones (for the synthetic cohort: the true joint centres, sex, age, BMI...) are
kept in ``ManifestRow.extra`` and written back unchanged.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from mris.constants import SIDES, SPLITS
from mris.errors import ManifestError
from mris.fsutil import atomic_write_text

REQUIRED_COLUMNS = (
    "pair_id",
    "subject_id",
    "side",
    "visit_month",
    "radiograph_path",
    "fc_path",
    "tc_path",
    "split",
)
OPTIONAL_COLUMNS = ("keypoint_x", "keypoint_y", "klg", "progressor")
DESIGN_COLUMNS = (
    "pair_id",
    "subject_id",
    "side",
    "visit_month",
    "radiograph_path",
    "keypoint_x",
    "keypoint_y",
    "fc_path",
    "tc_path",
    "klg",
    "progressor",
    "split",
)


@dataclass
class ManifestRow:
    """One knee at one visit. ``keypoint_x``/``keypoint_y`` are the joint centre in pixels
    (column, row) of the radiograph; ``None`` when unknown."""

    pair_id: str
    subject_id: str
    side: str  # LEFT or RIGHT (the patient's side)
    visit_month: int
    radiograph_path: str
    fc_path: str
    tc_path: str
    split: str
    keypoint_x: float | None = None
    keypoint_y: float | None = None
    klg: int | None = None
    # 1 when the knee's KL grade rises within 72 months of its first visit (the paper's
    # progression task; the synthetic cohort's mris.cohort.latent.PROGRESSION_MONTHS), 0 when not
    progressor: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def knee_id(self) -> str:
        """Identifies the knee across visits: ``<subject_id>:<side>``."""
        return f"{self.subject_id}:{self.side}"


def _optional_float(value: str) -> float | None:
    if value is None or value.strip() in ("", "NA", "nan", "NaN", "None"):
        return None
    number = float(value)
    return None if math.isnan(number) else number


def _optional_int(value: str) -> int | None:
    number = _optional_float(value)
    return None if number is None else int(round(number))


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(round(value, 4)) if not value.is_integer() else str(int(value)) + ".0"
    return str(value)


def _row_from_dict(record: dict[str, str], line: int) -> ManifestRow:
    try:
        side = record["side"].strip().upper()
        split = record["split"].strip()
        if side not in SIDES:
            raise ValueError(f"side must be LEFT or RIGHT, got {record['side']!r}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        klg = _optional_int(record.get("klg", ""))
        if klg is not None and not 0 <= klg <= 4:
            raise ValueError(f"klg must be 0-4, got {klg}")
        design = set(DESIGN_COLUMNS)
        return ManifestRow(
            pair_id=record["pair_id"].strip(),
            subject_id=record["subject_id"].strip(),
            side=side,
            visit_month=int(float(record["visit_month"])),
            radiograph_path=record["radiograph_path"].strip(),
            fc_path=record["fc_path"].strip(),
            tc_path=record["tc_path"].strip(),
            split=split,
            keypoint_x=_optional_float(record.get("keypoint_x", "")),
            keypoint_y=_optional_float(record.get("keypoint_y", "")),
            klg=klg,
            progressor=_optional_int(record.get("progressor", "")),
            extra={k: v for k, v in record.items() if k not in design and k is not None},
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise ManifestError(f"manifest line {line}: {exc}") from exc


@dataclass
class Manifest:
    """Rows plus the folder their relative paths are relative to."""

    rows: list[ManifestRow]
    root: Path

    def resolve_path(self, path: str) -> Path:
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self.root / candidate

    def select(self, splits: Sequence[str] | None = None) -> list[ManifestRow]:
        if splits is None:
            return list(self.rows)
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ManifestError(f"unknown split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
        return [row for row in self.rows if row.split in splits]

    def __len__(self) -> int:
        return len(self.rows)


def read_manifest(path: str | Path) -> Manifest:
    """Read a manifest CSV (or .parquet). Raises ``ManifestError`` with the line at fault."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ManifestError(
                "reading a Parquet manifest needs pyarrow (pip install pyarrow)"
            ) from exc
        table = pq.read_table(path).to_pylist()
        records = [{k: "" if v is None else str(v) for k, v in r.items()} for r in table]
    else:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise ManifestError(
                    f"manifest {path} lacks column(s): {', '.join(sorted(missing))}"
                )
            records = list(reader)
    rows = [_row_from_dict(record, line) for line, record in enumerate(records, start=2)]
    seen: set[str] = set()
    for row in rows:
        if row.pair_id in seen:
            raise ManifestError(f"manifest {path}: duplicate pair_id {row.pair_id!r}")
        seen.add(row.pair_id)
    return Manifest(rows=rows, root=path.parent.resolve())


def manifest_to_csv(rows: Iterable[ManifestRow]) -> str:
    rows = list(rows)
    extra_columns: list[str] = []
    for row in rows:
        for key in row.extra:
            if key not in extra_columns:
                extra_columns.append(key)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(list(DESIGN_COLUMNS) + extra_columns)
    names = {f.name for f in fields(ManifestRow)}
    for row in rows:
        values = [_format(getattr(row, column)) for column in DESIGN_COLUMNS if column in names]
        values += [row.extra.get(column, "") for column in extra_columns]
        writer.writerow(values)
    return buffer.getvalue()


def write_manifest(path: str | Path, rows: Iterable[ManifestRow]) -> Path:
    """Write the manifest atomically (temporary name, then rename)."""
    return atomic_write_text(path, manifest_to_csv(rows))
