"""``mris index calibrate``: fit the interval calibration (``mris.calibration``) of an index
bundle on held-out knees and publish it as a new bundle version.

The held-out knees are a manifest split the encoders never trained on and the database does
not hold: by default ``downstream`` (the split Table 3's classifiers train on; the cohort keeps
it apart from the encoders' ``train`` split and from the ``database`` split). Each knee goes
through the serving path (ROI by the localiser as a request's would be, the manifest's
keypoints where the localiser misses, ``Pipeline.search``, ``synthesize_maps`` with the
service's NaN rule), and its synthesized mean and SD are compared with its true maps.

The new version holds the same files as the old one (hard links where the file system allows)
plus ``calibration.json``, and a card naming the calibration (data, method, coverage achieved on
held-out knees); it is verified like any build and, with ``publish``, made current. Versions
stay immutable: the old one is untouched.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from mris.calibration import (
    CALIBRATION_FILE,
    DEFAULT_COVERAGE,
    Calibration,
    KneeSample,
    fit,
    neighbours_group,
)
from mris.constants import CARTILAGES
from mris.errors import ManifestError
from mris.fsutil import atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from mris.synthesis import DEFAULT_NAN_RULE

DEFAULT_SPLIT = "downstream"


def collect_samples(
    pipeline,
    manifest,
    rows: Sequence,
    *,
    k: int = 20,
    nan_rule: str = DEFAULT_NAN_RULE,
    use_localiser: bool = True,
    tick: Callable[[int, int], None] | None = None,
) -> list[KneeSample]:
    """The knees of ``rows`` through the serving path, each with its true maps."""
    from mris.evaluation.methods import collect_rois
    from mris.pipeline import synthesize_maps
    from mris.thickness import load_thickness_map

    roi_set = collect_rois(
        pipeline, manifest, rows, use_localiser and pipeline.localiser is not None, tick
    )
    samples = []
    for start in range(0, len(roi_set.rois), 64):
        rois = roi_set.rois[start : start + 64]
        for row, hits in zip(roi_set.rows[start : start + 64], pipeline.search(rois, k)):
            knee = synthesize_maps(hits, pipeline.index, k, nan_rule)
            truth = {
                "fc": load_thickness_map(manifest.resolve_path(row.fc_path)),
                "tc": load_thickness_map(manifest.resolve_path(row.tc_path)),
            }
            samples.append(
                KneeSample(
                    subject=row.subject_id,
                    group=neighbours_group(knee, pipeline.index.rows),
                    truth=truth,
                    mean={c: knee.maps_mm[c] for c in CARTILAGES},
                    sd={c: knee.std_mm[c] for c in CARTILAGES},
                )
            )
    return samples


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_calibrated_version(
    source: str | Path,
    calibration: Calibration,
    *,
    model_card=None,
    publish: bool = False,
) -> Path:
    """Write ``calibration`` into a new version of the index bundle ``source`` (a version
    folder, a ``current`` link or an index root), beside it: the same files (hard links where
    the file system allows), ``calibration.json`` and a card naming it; verified (against
    ``model_card`` when given) and, with ``publish``, made current. Returns its folder."""
    from mris.index import publish as publishing
    from mris.index.card import CARD_NAME, read_card
    from mris.index.verify import verify_bundle

    source = publishing.resolve(source)
    index_root = source.parent
    card = read_card(source)
    version = publishing.new_version_name()
    building = publishing.building_dir(index_root, version)
    building.mkdir()
    try:
        for path in source.iterdir():
            if path.is_file() and path.name not in (CARD_NAME, CALIBRATION_FILE):
                _link_or_copy(path, building / path.name)
        atomic_write_text(building / CALIBRATION_FILE, calibration.to_json())
        card.version = version
        card.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        card.source = {**card.source, "calibrated_from": source.name}
        card.calibration = calibration.summary()
        card.files[CALIBRATION_FILE] = sha256_file(building / CALIBRATION_FILE)
        card.sizes[CALIBRATION_FILE] = (building / CALIBRATION_FILE).stat().st_size
        atomic_write_json(building / CARD_NAME, card.model_dump(mode="json"))
        fsync_dir(building)
        verify_bundle(building, model_card=model_card)
        final = publishing.finalize(building, index_root, version)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if publish:
        publishing.publish(index_root, version)
    return final


def calibrate_bundle(
    model_dir: str | Path,
    manifest_path: str | Path,
    root: str | Path,
    *,
    split: str = DEFAULT_SPLIT,
    coverage: float = DEFAULT_COVERAGE,
    k: int = 20,
    nan_rule: str = DEFAULT_NAN_RULE,
    variant: str = "separate",
    publish: bool = False,
    tick: Callable[[int, int], None] | None = None,
) -> tuple[Path, Calibration]:
    """Fit the calibration of ``root``'s current bundle (or the bundle ``root`` is) on the
    manifest's ``split`` and write it as a new version beside it; returns (its folder, the
    calibration)."""
    from mris.index import publish as publishing
    from mris.manifest import read_manifest
    from mris.pipeline import Pipeline

    source = publishing.resolve(root)
    manifest = read_manifest(manifest_path)
    rows = [row for row in manifest.rows if row.split == split]
    if not rows:
        raise ManifestError(f"{manifest_path} has no rows in the split {split!r}")
    pipeline = Pipeline.load(model_dir, source, variant)
    samples = collect_samples(pipeline, manifest, rows, k=k, nan_rule=nan_rule, tick=tick)
    if not samples:
        raise ManifestError(f"no knee of the split {split!r} could be read")
    calibration = fit(
        samples,
        coverage,
        data={
            "manifest": str(Path(manifest_path).resolve()),
            "split": split,
            "k": k,
            "nan_rule": nan_rule,
            "calibrated_index_version": pipeline.index_version,
        },
    )
    final = write_calibrated_version(
        source, calibration, model_card=pipeline.model.card, publish=publish
    )
    return final, calibration


__all__ = [
    "DEFAULT_SPLIT",
    "calibrate_bundle",
    "collect_samples",
    "write_calibrated_version",
]
