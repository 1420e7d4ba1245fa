"""Import the public MRIS / OAI layout into the DESIGN manifest (``mris import-oai``).

Inputs (issue 4):

- ``SHEETS/**/mri_xray.csv``: ``patient_id, month, mri_left, mri_right, xray``. ``month`` is the
  visit of the MR (``00_MONTH``, ``12_MONTH``...); ``xray`` a folder relative to the X-ray root
  holding the DICOM file ``001``; the OAI visit code is the part of that path before the first
  ``.`` (0=0, 1=12, 2=18, 3=24, 4=30, 5=36, 6=48, 8=72, 10=96 months).
- ``SHEETS/**/xray_keypoints.csv``: ``patient_id, month, keypoint_right, keypoint_left``, each a
  quoted ``"[x, y]"`` pixel position (the right knee has the smaller x).
- maps at ``T/<patient_id>/MR_SAG_3D_DESS/<LEFT|RIGHT>_KNEE/<ENROLLMENT|12_MONTH|...>/avsm/``
  ``FC_2d_thickness.npy`` and ``TC_2d_thickness.npy`` (ENROLLMENT is month 0).
- optional KLG sheet ``ID, SIDE, READPRJ, V00XRKL, V01XRKL, ...`` (SIDE 1 = right, 2 = left;
  ``NA`` missing; comma, tab or ``|`` separated). Several reading projects may grade the same
  knee: the first non-missing grade in file order is used.
- a sheet under a folder named ``test_set`` gives split ``test``; under ``train_set/foldN``
  ``database``, or ``downstream`` when ``foldN`` is named in ``downstream_folds``.

Decisions: one manifest row per knee-visit whose radiograph and both maps exist; a side whose
``mri_<side>`` cell is empty/NA/0 is skipped ("no MR for this knee"). ``visit_month`` is the
sheet's ``month`` (the visit of the thickness maps, the target); the radiograph's own visit
(from its visit code) is kept in the extra column ``xray_month`` and picks the KLG column.
Paths are written absolute. ``pair_id`` is ``<patient>_<SIDE>_<month:03d>``; a pair seen twice
(or a subject in two splits) keeps its first occurrence.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mris.errors import BadParameter
from mris.manifest import ManifestRow, write_manifest

VISIT_CODE_MONTHS = {0: 0, 1: 12, 2: 18, 3: 24, 4: 30, 5: 36, 6: 48, 8: 72, 10: 96}
MONTH_VISIT_CODES = {month: code for code, month in VISIT_CODE_MONTHS.items()}
SIDE_CODES = {"1": "RIGHT", "2": "LEFT"}
_MISSING = {"", "na", "nan", "none", "null", "0", "false", "."}


@dataclass
class ImportSummary:
    """What ``import_oai`` did: sheet rows read, manifest rows written, skips by reason."""

    rows_read: int = 0
    knee_visits: int = 0
    rows: list[ManifestRow] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    without_keypoints: int = 0
    without_klg: int = 0

    @property
    def written(self) -> int:
        return len(self.rows)

    def lines(self) -> list[str]:
        out = [
            f"sheet rows read: {self.rows_read}",
            f"knee-visits considered: {self.knee_visits}",
            f"rows written: {self.written}",
        ]
        splits = Counter(row.split for row in self.rows)
        out.append("by split: " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
        for reason, count in sorted(self.skipped.items()):
            out.append(f"skipped ({reason}): {count}")
        out.append(f"written without keypoints: {self.without_keypoints}")
        out.append(f"written without KL grade: {self.without_klg}")
        return out


def parse_month(text: str) -> int:
    """``00_MONTH`` / ``12_MONTH`` / ``12`` / ``ENROLLMENT`` -> months."""
    value = str(text).strip().upper()
    if value == "ENROLLMENT":
        return 0
    match = re.fullmatch(r"(\d+)(_MONTHS?)?", value)
    if not match:
        raise ValueError(f"unrecognised month {text!r}")
    return int(match.group(1))


def month_folder(month: int) -> str:
    """The thickness-map folder name of a visit: ENROLLMENT or ``12_MONTH``..."""
    return "ENROLLMENT" if month == 0 else f"{month:02d}_MONTH"


def xray_visit_month(xray: str) -> int | None:
    """Months of an OAI X-ray folder from its visit code (``1.C.2/...`` -> 12); None if unknown."""
    head = str(xray).strip().lstrip("/").split(".", 1)[0]
    try:
        return VISIT_CODE_MONTHS.get(int(head))
    except ValueError:
        return None


def parse_point(text: str) -> tuple[float, float] | None:
    """``"[x, y]"`` -> (x, y); None when missing."""
    if text is None or str(text).strip().lower() in _MISSING - {"0"}:
        return None
    try:
        values = json.loads(str(text).strip())
    except json.JSONDecodeError:
        values = [v for v in re.split(r"[\s,;()\[\]]+", str(text)) if v]
    if len(values) != 2:
        raise ValueError(f"a keypoint must be [x, y], got {text!r}")
    return float(values[0]), float(values[1])


def split_of(sheet: Path, sheets_root: Path, downstream_folds: set[str]) -> str | None:
    """The split a sheet's folder stands for, or None when it is neither test nor a fold."""
    parts = [p.lower() for p in sheet.relative_to(sheets_root).parts[:-1]]
    if "test_set" in parts:
        return "test"
    if "train_set" in parts:
        after = parts[parts.index("train_set") + 1 :]
        fold = next((p for p in after if re.fullmatch(r"fold\d+", p)), None)
        if fold is None:
            return "database"
        return "downstream" if fold in downstream_folds else "database"
    return None


def _normalise_folds(folds: Iterable[str]) -> set[str]:
    names: set[str] = set()
    for item in folds:
        for part in str(item).split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part.isdigit():
                part = f"fold{int(part)}"
            if not re.fullmatch(r"fold\d+", part):
                raise BadParameter(
                    f"--downstream-folds takes fold names like fold3 or 3, got {item!r}"
                )
            names.add(f"fold{int(part[4:])}")
    return names


def _read_csv(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8-sig")
    sample = text[:4096]
    delimiter = max([",", "\t", "|"], key=sample.count)
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def read_keypoints(
    sheets_root: Path,
) -> dict[tuple[str, int], dict[str, tuple[float, float] | None]]:
    """(patient_id, month) -> {"RIGHT": (x, y) | None, "LEFT": ...} from every
    xray_keypoints.csv."""
    points: dict[tuple[str, int], dict[str, tuple[float, float] | None]] = {}
    for sheet in sorted(sheets_root.rglob("xray_keypoints.csv")):
        for record in _read_csv(sheet):
            try:
                key = (record["patient_id"], parse_month(record["month"]))
                points.setdefault(
                    key,
                    {
                        "RIGHT": parse_point(record.get("keypoint_right", "")),
                        "LEFT": parse_point(record.get("keypoint_left", "")),
                    },
                )
            except (KeyError, ValueError):
                continue
    return points


def read_klg(path: Path) -> dict[tuple[str, str, int], int]:
    """(patient_id, SIDE, visit code) -> KL grade, first non-missing grade in file order."""
    grades: dict[tuple[str, str, int], int] = {}
    for record in _read_csv(path):
        side = SIDE_CODES.get(record.get("SIDE", "").strip().split(":")[0].strip())
        patient = record.get("ID", "").strip()
        if side is None or not patient:
            continue
        for column, value in record.items():
            match = re.fullmatch(r"V(\d{2})XRKL", column.upper())
            grade = re.match(r"\s*([0-4])(\.0+)?\b", value or "")
            if match and grade:
                grades.setdefault((patient, side, int(match.group(1))), int(grade.group(1)))
    return grades


def import_oai(
    sheets_root: str | Path,
    xray_root: str | Path,
    thickness_root: str | Path,
    klg_path: str | Path | None = None,
    downstream_folds: Sequence[str] = (),
) -> ImportSummary:
    """Build manifest rows from the MRIS/OAI layout (see the module docstring)."""
    sheets_root, xray_root, thickness_root = (
        Path(sheets_root).resolve(),
        Path(xray_root).resolve(),
        Path(thickness_root).resolve(),
    )
    for name, folder in (
        ("--sheets", sheets_root),
        ("--xray-root", xray_root),
        ("--thickness-root", thickness_root),
    ):
        if not folder.is_dir():
            raise BadParameter(f"{name} {folder} is not a folder")
    folds = _normalise_folds(downstream_folds)
    klg: dict[tuple[str, str, int], int] = {}
    if klg_path is not None:
        if not Path(klg_path).is_file():
            raise BadParameter(f"--klg {klg_path} is not a file")
        klg = read_klg(Path(klg_path))
    keypoints = read_keypoints(sheets_root)
    sheets = sorted(sheets_root.rglob("mri_xray.csv"))
    if not sheets:
        raise BadParameter(f"no mri_xray.csv under {sheets_root}")

    summary = ImportSummary()
    seen_pairs: set[str] = set()
    subject_split: dict[str, str] = {}
    for sheet in sheets:
        split = split_of(sheet, sheets_root, folds)
        records = _read_csv(sheet)
        summary.rows_read += len(records)
        if split is None:
            summary.skipped["sheet not under test_set or train_set"] += 2 * len(records)
            summary.knee_visits += 2 * len(records)
            continue
        for record in records:
            _import_record(
                record,
                split,
                xray_root,
                thickness_root,
                keypoints,
                klg,
                summary,
                seen_pairs,
                subject_split,
            )
    return summary


def _import_record(
    record: dict[str, str],
    split: str,
    xray_root: Path,
    thickness_root: Path,
    keypoints: dict,
    klg: dict,
    summary: ImportSummary,
    seen_pairs: set[str],
    subject_split: dict[str, str],
) -> None:
    patient = record.get("patient_id", "").strip()
    xray = record.get("xray", "").strip()
    try:
        month = parse_month(record.get("month", ""))
    except ValueError:
        month = None
    if not patient or month is None or not xray:
        summary.knee_visits += 2
        summary.skipped["malformed sheet row"] += 2
        return
    xray_month = xray_visit_month(xray)
    radiograph = xray_root / xray / "001"
    for side in ("RIGHT", "LEFT"):
        summary.knee_visits += 1
        if record.get(f"mri_{side.lower()}", "").strip().lower() in _MISSING:
            summary.skipped["no MR for this knee"] += 1
            continue
        pair_id = f"{patient}_{side}_{month:03d}"
        if pair_id in seen_pairs:
            summary.skipped["duplicate knee-visit"] += 1
            continue
        if subject_split.setdefault(patient, split) != split:
            summary.skipped["subject already in another split"] += 1
            continue
        maps = (
            thickness_root
            / patient
            / "MR_SAG_3D_DESS"
            / f"{side}_KNEE"
            / month_folder(month)
            / "avsm"
        )
        fc_path, tc_path = maps / "FC_2d_thickness.npy", maps / "TC_2d_thickness.npy"
        if not radiograph.is_file():
            summary.skipped["radiograph missing"] += 1
            continue
        if not fc_path.is_file() or not tc_path.is_file():
            summary.skipped["thickness map missing"] += 1
            continue
        point = keypoints.get((patient, month), {}).get(side)
        grade = (
            klg.get((patient, side, MONTH_VISIT_CODES.get(xray_month, -1)))
            if xray_month is not None
            else None
        )
        summary.without_keypoints += point is None
        summary.without_klg += grade is None
        seen_pairs.add(pair_id)
        summary.rows.append(
            ManifestRow(
                pair_id=pair_id,
                subject_id=patient,
                side=side,
                visit_month=month,
                radiograph_path=str(radiograph),
                fc_path=str(fc_path),
                tc_path=str(tc_path),
                split=split,
                keypoint_x=None if point is None else point[0],
                keypoint_y=None if point is None else point[1],
                klg=grade,
                extra={"xray_month": "" if xray_month is None else str(xray_month)},
            )
        )


def write_oai_manifest(summary: ImportSummary, out: str | Path) -> Path:
    """Write the imported rows as the DESIGN manifest (atomically)."""
    return write_manifest(out, summary.rows)
