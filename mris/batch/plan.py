"""What a batch job is: its inputs, their shards, its identity and what is already done.

Inputs are radiograph files: a manifest's ``radiograph_path`` values (each radiograph once,
both its knees; optionally only some splits), or every regular file under a folder (hidden
files skipped; DICOM files often have no extension, so none is required). They are sorted, so
the same inputs always make the same shards: shard ``i`` holds inputs ``[i * size, (i + 1) *
size)``.

The output folder (``OUT``)::

    job.json                  the job's identity (JobSpec): inputs' digest, shard size, model,
                              index bundle, variant, k, NaN rule, maps dtype
    rows/shard-00000.parquet  one row per knee (``mris.batch.shard.ROW_COLUMNS``)
    failures/shard-00000.parquet
                              one row per input that gave no knee, with its reason
    maps/shard-00000.npy      [knees, 4, H, W] fc, tc, fc SD, tc SD in mm (NaN outside cartilage)
    summary.json              written when every shard is complete

Each file is written atomically (``mris.fsutil.atomic_write``). A shard is complete when its
``rows`` file exists: it is written last, after its maps and failures, so a shard interrupted at
any point is redone whole and every knee is in the output exactly once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mris.errors import BadParameter, ManifestError
from mris.fsutil import atomic_write_json

JOB_FILE = "job.json"
SUMMARY_FILE = "summary.json"
ROWS_DIR, FAILURES_DIR, MAPS_DIR = "rows", "failures", "maps"
MAP_LAYERS = ("fc", "tc", "fc_sd", "tc_sd")
"""The planes of a knee in a maps shard: the synthesized femoral and tibial maps, then their
neighbours' weighted standard deviations."""
MAPS_DTYPES = ("float16", "float32")
DEFAULT_SHARD_SIZE = 32
JOB_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """Inputs ``[start, start + len(files))`` of the sorted list, as absolute paths, and the
    names the rows give them (``sources``: relative to the manifest's or folder's root)."""

    number: int
    files: tuple[str, ...]
    sources: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}"


@dataclass(frozen=True)
class BatchInputs:
    """The sorted inputs: absolute paths and their names relative to ``root``."""

    root: Path
    files: tuple[str, ...]
    sources: tuple[str, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the sorted source names: a rerun must see the same inputs."""
        return hashlib.sha256("\n".join(self.sources).encode("utf-8")).hexdigest()

    def shards(self, size: int) -> list[Shard]:
        if size < 1:
            raise BadParameter(f"--shard-size must be at least 1, got {size}")
        return [
            Shard(i // size, self.files[i : i + size], self.sources[i : i + size])
            for i in range(0, len(self.files), size)
        ]


def _inputs(root: Path, paths: Sequence[Path]) -> BatchInputs:
    named = sorted({(_relative(path, root), str(path)) for path in paths})
    if not named:
        raise BadParameter("no input radiographs")
    return BatchInputs(
        root=root,
        files=tuple(path for _, path in named),
        sources=tuple(source for source, _ in named),
    )


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def inputs_from_manifest(manifest_path: str | Path, splits: Sequence[str] = ()) -> BatchInputs:
    """Each radiograph a manifest names once (rows of ``splits`` only, when given)."""
    from mris.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    rows = [row for row in manifest.rows if not splits or row.split in splits]
    if not rows:
        raise ManifestError(
            f"{manifest_path} has no rows"
            + (f" in the splits {', '.join(splits)}" if splits else "")
        )
    paths = [manifest.resolve_path(row.radiograph_path).resolve() for row in rows]
    return _inputs(Path(manifest_path).resolve().parent, paths)


def inputs_from_folder(folder: str | Path) -> BatchInputs:
    """Every regular, non-hidden file under ``folder`` (recursively)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise BadParameter(f"{folder} is not a folder")
    paths = [
        path
        for path in root.rglob("*")
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return _inputs(root, paths)


@dataclass(frozen=True)
class JobSpec:
    """A job's identity: a rerun into the same ``OUT`` must match it (``check_job``)."""

    inputs_digest: str
    inputs: int
    shard_size: int
    model: str  # the model bundle's folder (absolute) and card time
    model_created: str
    index_bundle: str  # the index bundle's folder (absolute): its version is pinned
    index_version: str
    variant: str
    k: int
    nan_rule: str
    maps_dtype: str | None  # None: no maps written
    format: int = JOB_FORMAT

    def describe_difference(self, other: JobSpec) -> str:
        mine, theirs = asdict(self), asdict(other)
        return ", ".join(
            f"{key} {theirs[key]!r} -> {mine[key]!r}" for key in mine if mine[key] != theirs[key]
        )


def check_job(out: Path, spec: JobSpec) -> bool:
    """Write ``out/job.json`` for a new job; for an existing one, check that ``spec`` is the same
    job (``BadParameter`` naming what differs). True when the job existed (a resume)."""
    path = out / JOB_FILE
    if path.exists():
        try:
            stored = JobSpec(**json.loads(path.read_text(encoding="utf-8")))
        except (TypeError, ValueError) as exc:
            raise BadParameter(f"{path} is not a job file of this version: {exc}") from None
        if stored != spec:
            raise BadParameter(
                f"{out} holds another job ({spec.describe_difference(stored)}); resume it with "
                "the same inputs and options, or write to a new --out"
            )
        return True
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, asdict(spec))
    return False


def shard_paths(out: Path, shard: Shard) -> dict[str, Path]:
    """Where a shard's rows, failures and maps go."""
    return {
        "rows": out / ROWS_DIR / f"{shard.name}.parquet",
        "failures": out / FAILURES_DIR / f"{shard.name}.parquet",
        "maps": out / MAPS_DIR / f"{shard.name}.npy",
    }


def is_complete(out: Path, shard: Shard) -> bool:
    return shard_paths(out, shard)["rows"].exists()


def remove_partial_files(out: Path) -> int:
    """Delete what an interrupted run left: temporary files (``.tmp-*``), and the maps and
    failures of shards whose rows were never written. Returns how many files went."""
    removed = 0
    for folder in (ROWS_DIR, FAILURES_DIR, MAPS_DIR):
        for path in (out / folder).glob(".tmp-*"):
            path.unlink(missing_ok=True)
            removed += 1
    for folder, suffix in ((FAILURES_DIR, ".parquet"), (MAPS_DIR, ".npy")):
        for path in (out / folder).glob(f"shard-*{suffix}"):
            if not (out / ROWS_DIR / f"{path.name[: -len(suffix)]}.parquet").exists():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


__all__ = [
    "BatchInputs",
    "DEFAULT_SHARD_SIZE",
    "JobSpec",
    "MAPS_DTYPES",
    "MAP_LAYERS",
    "Shard",
    "check_job",
    "inputs_from_folder",
    "inputs_from_manifest",
    "is_complete",
    "remove_partial_files",
    "shard_paths",
]
