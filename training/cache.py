"""Preprocessed encoder inputs, computed once and memory-mapped by every epoch.

The cache of a run lives in ``CACHE_DIR/<key>/`` with one ``.npy`` per array:
``radiograph.npy`` ``[N, S, S]`` (ROIs from ``mris.roi``), ``fc.npy`` / ``tc.npy`` ``[N, S, S]`` and
``combined.npy`` ``[N, 2S, S]`` (from ``mris.thickness``), float32, rows in ``rows.json`` order.
``key`` hashes the manifest's bytes, the rows' pair ids, ``PreprocessConfig.fingerprint()``,
``PREPROCESSING_VERSION`` and ``CACHE_FORMAT``: a changed manifest, preprocessing constant or
ROI normalisation gives a new key and so a rebuild;
epochs never decode a DICOM again. Each array is written atomically (``mris.fsutil``), so an
interrupted build leaves no half array that looks complete.

Only the shared preprocessing code computes these inputs (DESIGN.md: one implementation for
training, index building and serving); this module only stores what it returns.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mris.constants import PREPROCESSING_VERSION, PreprocessConfig
from mris.errors import ManifestError
from mris.fsutil import atomic_save_npy, atomic_write_json
from mris.manifest import Manifest, ManifestRow
from mris.npyio import load_npy

CACHE_FORMAT = "mris-train-cache/1"
ARRAYS = ("radiograph", "fc", "tc", "combined")

# (radiograph, rows without keypoints) -> side -> (col, row); used when a row has no keypoint.
LocateFn = Callable[[object, Sequence[str]], dict]


def cache_key(manifest_path: Path, rows: Sequence[ManifestRow], config: PreprocessConfig) -> str:
    digest = hashlib.sha256()
    digest.update(CACHE_FORMAT.encode())
    digest.update(Path(manifest_path).read_bytes())
    digest.update("\n".join(row.pair_id for row in rows).encode())
    digest.update(config.fingerprint().encode())
    digest.update(f"preprocessing-{PREPROCESSING_VERSION}".encode())
    return digest.hexdigest()[:20]


@dataclass
class EncoderCache:
    """Memory-mapped encoder inputs of ``rows`` (same order)."""

    root: Path
    rows: list[ManifestRow]
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]


def _radiograph_rois(
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    config: PreprocessConfig,
    locate: LocateFn | None,
    tick: Callable[[int], None],
) -> np.ndarray:
    from mris.dicom import read_radiograph
    from mris.roi import extract_roi

    out = np.zeros((len(rows), config.encoder_px, config.encoder_px), np.float32)
    by_image: dict[str, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        by_image[row.radiograph_path].append(position)
    for path, positions in by_image.items():
        radiograph = read_radiograph(manifest.resolve_path(path))
        missing = [
            rows[p].side
            for p in positions
            if rows[p].keypoint_x is None or rows[p].keypoint_y is None
        ]
        located: dict = {}
        if missing:
            if locate is None:
                raise ManifestError(
                    f"{path}: no keypoint_x/keypoint_y for side(s) {', '.join(missing)} and "
                    "no knee "
                    "localiser to find them (train one first or add keypoints to the manifest)"
                )
            located = locate(radiograph, missing)
        for p in positions:
            row = rows[p]
            if row.keypoint_x is not None and row.keypoint_y is not None:
                centre, source = (row.keypoint_x, row.keypoint_y), "manifest"
            else:
                centre, source = tuple(located[row.side][0]), "localiser"
            out[p] = extract_roi(radiograph, row.side, centre, config, source=source).image
        tick(len(positions))
    return out


def _thickness_inputs(
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    config: PreprocessConfig,
    name: str,
    tick: Callable[[int], None],
) -> np.ndarray:
    from mris.thickness import combined_input, load_thickness_map, map_to_input

    rows_px = 2 * config.encoder_px if name == "combined" else config.encoder_px
    out = np.zeros((len(rows), rows_px, config.encoder_px), np.float32)
    for p, row in enumerate(rows):
        if name == "combined":
            fc = load_thickness_map(manifest.resolve_path(row.fc_path))
            tc = load_thickness_map(manifest.resolve_path(row.tc_path))
            out[p] = combined_input(fc, tc, config)
        else:
            path = row.fc_path if name == "fc" else row.tc_path
            out[p] = map_to_input(load_thickness_map(manifest.resolve_path(path)), config)
        tick(1)
    return out


def build_cache(
    manifest_path: Path,
    manifest: Manifest,
    rows: Sequence[ManifestRow],
    config: PreprocessConfig,
    cache_dir: Path,
    names: Sequence[str] = ARRAYS,
    locate: LocateFn | None = None,
    tick: Callable[[str, int, int], None] | None = None,
) -> EncoderCache:
    """Return the cache of ``rows`` for ``names``, building only the arrays not yet on disk.

    ``tick(name, done, total)`` reports progress.
    """
    unknown = set(names) - set(ARRAYS)
    if unknown:
        raise ValueError(f"unknown cache arrays {sorted(unknown)}")
    rows = list(rows)
    root = Path(cache_dir) / cache_key(manifest_path, rows, config)
    root.mkdir(parents=True, exist_ok=True)
    meta = root / "rows.json"
    if not meta.is_file():
        atomic_write_json(
            meta,
            {
                "format": CACHE_FORMAT,
                "preprocess": config.to_dict(),
                "pair_ids": [row.pair_id for row in rows],
            },
        )
    arrays: dict[str, np.ndarray] = {}
    for name in names:
        path = root / f"{name}.npy"
        if not path.is_file():
            done = 0

            def step(count: int, name: str = name) -> None:
                nonlocal done
                done += count
                if tick is not None:
                    tick(name, done, len(rows))

            if name == "radiograph":
                array = _radiograph_rois(manifest, rows, config, locate, step)
            else:
                array = _thickness_inputs(manifest, rows, config, name, step)
            atomic_save_npy(path, array)
        arrays[name] = load_npy(path, mmap_mode="r")
    return EncoderCache(root=root, rows=rows, arrays=arrays)


def cached_pair_ids(root: Path) -> list[str]:
    return json.loads((Path(root) / "rows.json").read_text())["pair_ids"]
