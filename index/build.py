"""Build FAISS indexes and whole index bundles (autofaiss's ``indices/build.py`` role).

``build_faiss_index`` turns L2-normalised embeddings and an ``IndexSpec`` (``choose.py``) into a
CPU FAISS index, tuning ``nprobe`` for IVF kinds to the smallest value whose recall@20 against
exact search reaches the target, and returns the measured recall.

``build_index_bundle`` is the whole ``mris index build``:

1. load and verify the model bundle (sha256 of every file), read the manifest, select the rows;
   with ``append_from`` load the base bundle and refuse it unless its encoders are these;
2. check every map file exists (the full list of missing ones, or skip them);
3. in ``INDEX_ROOT/.building-<version>-<pid>/``: stream maps -> embeddings (``embed.py``) while
   writing the maps arrays; build each region's index; write rows, card and checksums;
4. verify the folder (``verify.py``), rename it to ``<version>``, and with ``publish`` flip
   ``current`` (``publish.py``).

Any failure or interruption removes the building folder; ``current`` is only ever touched by the
final flip. Stale building folders of dead processes are removed at the start.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from mris.index import publish as publishing
from mris.index.bundle import (
    CARD_NAME,
    MAPS_DTYPES,
    REGION_MAPS,
    ROWS_NAME,
    IndexCard,
    MapsCard,
    MapsWriter,
    RegionCard,
    RowMeta,
    embeddings_name,
    index_name,
    maps_name,
    read_card,
    read_rows,
    write_rows,
)
from mris.index.choose import DEFAULT_MEMORY_BUDGET_BYTES, IndexSpec, choose_index
from mris.index.embed import embed_rows, find_missing
from mris.index.verify import exact_top_k, perturbed_queries, recall_at_k, verify_bundle

from mris.constants import CARTILAGES, PREPROCESSING_VERSION
from mris.encoders import OnnxEncoder, default_threads
from mris.errors import BadParameter, BundleMismatch, ManifestError, MrisError
from mris.fsutil import atomic_save_npy, atomic_write_json, fsync_dir, sha256_file
from mris.manifest import read_manifest
from mris.model_bundle import VARIANT_REGIONS, load_model_bundle

RECALL_K = 20
RECALL_QUERIES = 1000


@dataclass
class BuiltIndex:
    index: Any
    spec: IndexSpec
    nprobe: int = 0
    recall_at_20: float = 1.0
    recall_queries: int = 0
    recall_method: str = "exact index"
    seconds: float = 0.0


def set_faiss_threads(threads: int | None) -> None:
    import faiss

    faiss.omp_set_num_threads(threads or default_threads())


def build_faiss_index(embeddings: np.ndarray, spec: IndexSpec, seed: int = 0, recall_queries: int = RECALL_QUERIES) -> BuiltIndex:
    """A CPU FAISS inner-product index over ``embeddings`` (float32 [rows, d], unit norm)."""
    import faiss

    start = time.perf_counter()
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    rows, dim = embeddings.shape
    if spec.kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(embeddings)
        return BuiltIndex(index, spec, seconds=time.perf_counter() - start)

    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = embeddings if spec.train_rows >= rows else embeddings[np.sort(rng.choice(rows, spec.train_rows, replace=False))]
    index.train(train)
    for begin in range(0, rows, 65536):
        index.add(embeddings[begin : begin + 65536])
    # Tune nprobe on radiograph-like queries against exact search; the smallest nprobe that
    # reaches the target wins (latency grows with nprobe).
    k = min(RECALL_K, rows)
    queries = perturbed_queries(embeddings, recall_queries, seed=seed + 1)
    truth = exact_top_k(embeddings, queries, k)
    ivf = faiss.extract_index_ivf(index)
    chosen, recall = spec.nprobe_candidates[-1], 0.0
    for nprobe in spec.nprobe_candidates:
        ivf.nprobe = nprobe
        recall = recall_at_k(index.search(queries, k)[1], truth)
        if recall >= spec.target_recall:
            chosen = nprobe
            break
    ivf.nprobe = chosen
    return BuiltIndex(
        index,
        spec,
        nprobe=chosen,
        recall_at_20=float(recall),
        recall_queries=len(queries),
        recall_method=f"{len(queries)} stored embeddings + noise (cosine ~0.8) vs exact IndexFlatIP",
        seconds=time.perf_counter() - start,
    )


@dataclass
class BuildResult:
    version: str
    path: Path
    rows: int
    new_rows: int
    reused_rows: int
    skipped: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    embed_seconds: float = 0.0
    size_bytes: int = 0
    published: bool = False
    card: IndexCard | None = None

    @property
    def maps_per_second(self) -> float:
        return self.new_rows / self.embed_seconds if self.embed_seconds > 0 else float("nan")


def _versions() -> dict[str, str]:
    import faiss
    import onnxruntime

    import mris

    return {"faiss": faiss.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "mris": mris.__version__}


def build_index_bundle(
    model_dir: str | Path,
    manifest_path: str | Path,
    root: str | Path,
    *,
    splits: Sequence[str] = ("database",),
    variant: str = "separate",
    kind: str = "flat",
    device: str = "auto",
    publish: bool = False,
    append_from: str | None = None,
    skip_missing: bool = False,
    maps_dtype: str = "float32",
    batch_size: int = 16,
    threads: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> BuildResult:
    """Build (and optionally publish) a new index bundle version under ``root``."""
    started = time.perf_counter()
    if variant not in VARIANT_REGIONS:
        raise BadParameter(f"--variant must be separate or combined, got {variant!r}")
    if maps_dtype not in MAPS_DTYPES:
        raise BadParameter(f"--maps-dtype must be one of {', '.join(MAPS_DTYPES)}, got {maps_dtype!r}")
    model = load_model_bundle(model_dir)  # BundleInvalid when incomplete or not matching its card
    if variant not in model.card.variants:
        raise BadParameter(f"model bundle {model_dir} has no '{variant}' variant")
    config = model.card.preprocess_config
    regions = list(model.card.variants[variant].regions)
    manifest = read_manifest(manifest_path)  # ManifestError when missing or malformed
    rows = manifest.select(list(splits))
    if not rows:
        raise ManifestError(f"manifest {manifest_path} has no rows for split(s) {', '.join(splits)}")
    root = Path(root)

    base_card: IndexCard | None = None
    base_path: Path | None = None
    base_rows: list[RowMeta] = []
    if append_from is not None:
        base_path = publishing.resolve(root / append_from if not Path(append_from).is_absolute() else Path(append_from))
        base_card = read_card(base_path)
        if base_card.variant != variant:
            raise BundleMismatch(f"cannot append: {base_card.version} is variant '{base_card.variant}', not '{variant}'")
        from mris.index.bundle import check_encoders

        try:
            check_encoders(base_card, model.card)
        except BundleMismatch as exc:
            raise BundleMismatch(f"cannot append: {exc.detail}; rebuild from scratch instead") from exc
        if base_card.maps["fc"].dtype != maps_dtype:
            raise BadParameter(f"cannot append: {base_card.version} stores maps as {base_card.maps['fc'].dtype}, asked {maps_dtype}")
        base_rows = read_rows(base_path / ROWS_NAME)
        known = {row.pair_id for row in base_rows}
        rows = [row for row in rows if row.pair_id not in known]
        if not rows:
            raise ManifestError(f"nothing to append: every selected manifest row is already in {base_card.version}")

    skipped: dict[str, list[str]] = {}
    missing = find_missing(manifest, rows)
    if missing:
        if not skip_missing:
            shown = "; ".join(f"{pair}: {path}" for pair, path in missing[:20])
            more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
            raise ManifestError(f"{len(missing)} map file(s) missing: {shown}{more} (or pass --skip-missing)")
        bad = {pair for pair, _ in missing}
        skipped["missing"] = sorted(bad)
        rows = [row for row in rows if row.pair_id not in bad]
        if not rows:
            raise ManifestError("every selected row has a missing map file")

    root.mkdir(parents=True, exist_ok=True)
    publishing.remove_stale_builds(root)
    version = publishing.new_version_name()
    building = publishing.building_dir(root, version)
    building.mkdir()
    try:
        threads = threads or default_threads()
        set_faiss_threads(threads)
        encoders = {
            region: OnnxEncoder(
                model.encoder_path(variant, region, "thickness"),
                device=device,
                intra_op_threads=threads,
                batch_size=batch_size,
            )
            for region in regions
        }
        n_new = len(rows)
        writers = {c: MapsWriter(building / maps_name(c), n_new, maps_dtype) for c in CARTILAGES}

        def on_maps(i: int, fc: np.ndarray, tc: np.ndarray) -> None:
            writers["fc"].write(i, fc)
            writers["tc"].write(i, tc)

        if on_start is not None:
            on_start(n_new)
        streamed = embed_rows(
            manifest, rows, encoders, variant, config, on_maps=on_maps, skip_bad=skip_missing,
            batch_size=batch_size, on_progress=on_progress,
        )
        for reason, pairs in streamed.skipped.items():
            skipped.setdefault(reason, []).extend(pairs)
        keep = streamed.keep
        if not keep.any():
            raise ManifestError("no usable thickness map among the selected rows")
        kept_rows = [row for row, kept in zip(rows, keep) if kept]
        new_embeddings = {region: streamed.embeddings[region][keep] for region in regions}
        map_shapes = {c: writers[c].finish(keep) for c in CARTILAGES}
        if base_card is not None:
            base_shape = tuple(base_card.maps["fc"].shape[1:])
            if tuple(map_shapes["fc"][1:]) != base_shape:
                raise BadParameter(f"cannot append: new maps are {map_shapes['fc'][1:]}, {base_card.version} holds {base_shape}")
            map_shapes = {c: _prepend_maps(base_path / maps_name(c), building / maps_name(c)) for c in CARTILAGES}
            new_embeddings = {
                region: np.concatenate([np.load(base_path / embeddings_name(region)), new_embeddings[region]])
                for region in regions
            }
        total = len(base_rows) + len(kept_rows)
        metas = list(base_rows) + [
            RowMeta(len(base_rows) + i, r.pair_id, r.subject_id, r.side, r.visit_month, r.klg, r.progressor)
            for i, r in enumerate(kept_rows)
        ]
        write_rows(building / ROWS_NAME, metas)

        import faiss

        region_cards = {}
        dim = new_embeddings[regions[0]].shape[1]
        for region in regions:
            atomic_save_npy(building / embeddings_name(region), new_embeddings[region])
            spec = choose_index(total, dim, kind=kind, memory_budget_bytes=memory_budget_bytes)
            built = build_faiss_index(new_embeddings[region], spec)
            faiss.write_index(built.index, str(building / index_name(region)))
            pair = model.card.variants[variant].regions[region]
            region_cards[region] = RegionCard(
                thickness_encoder=pair.thickness,
                thickness_encoder_sha256=model.card.files[pair.thickness],
                radiograph_encoder=pair.radiograph,
                radiograph_encoder_sha256=model.card.files[pair.radiograph],
                embeddings_file=embeddings_name(region),
                index_file=index_name(region),
                maps=REGION_MAPS[region],
                kind=spec.kind,
                factory=spec.factory,
                nlist=spec.nlist,
                nprobe=built.nprobe,
                exact=spec.exact,
                recall_at_20=built.recall_at_20,
                recall_queries=built.recall_queries,
                recall_method=built.recall_method,
                reason=spec.reason,
            )
        files = sorted(p.name for p in building.iterdir() if p.is_file())
        source: dict[str, Any] = {
            "manifest": str(Path(manifest_path).resolve()),
            "splits": list(splits),
            "model_dir": str(Path(model_dir).resolve()),
            "new_rows": len(kept_rows),
            "skipped": {reason: len(pairs) for reason, pairs in skipped.items()},
            "skipped_pair_ids": {reason: pairs[:100] for reason, pairs in skipped.items()},
        }
        if base_card is not None:
            source.update(appended_from=base_card.version, reused_rows=len(base_rows))
        card = IndexCard(
            version=version,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            build_seconds=round(time.perf_counter() - started, 3),
            variant=variant,
            rows=total,
            embedding_dim=dim,
            preprocess=model.card.preprocess,
            preprocessing_version=PREPROCESSING_VERSION,
            preprocess_fingerprint=config.fingerprint(),
            regions=region_cards,
            maps={c: MapsCard(file=maps_name(c), shape=map_shapes[c], dtype=maps_dtype) for c in CARTILAGES},
            source=source,
            versions=_versions(),
            files={name: sha256_file(building / name) for name in files},
            sizes={name: (building / name).stat().st_size for name in files},
        )
        atomic_write_json(building / CARD_NAME, card.model_dump(mode="json"))
        for entry in building.iterdir():  # temp-file writes are 0600; a service user must read them
            entry.chmod(0o644)
        building.chmod(0o755)
        fsync_dir(building)
        verify_bundle(building, model_card=model.card)
        final = publishing.finalize(building, root, version)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if publish:
        publishing.publish(root, version)
    return BuildResult(
        version=version,
        path=final,
        rows=total,
        new_rows=len(kept_rows),
        reused_rows=len(base_rows),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        embed_seconds=streamed.seconds,
        size_bytes=publishing.dir_size(final),
        published=publish,
        card=card,
    )


def _prepend_maps(base_file: Path, new_file: Path) -> tuple[int, int, int]:
    """Rewrite ``new_file`` as base rows followed by its own rows (chunked copy)."""
    base = np.load(base_file, mmap_mode="r")
    new = np.load(new_file, mmap_mode="r")
    tmp = new_file.with_name(new_file.name + ".append.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=base.dtype, shape=(len(base) + len(new), *base.shape[1:]))
    for start in range(0, len(base), 1024):
        chunk = base[start : start + 1024]
        out[start : start + len(chunk)] = chunk
    for start in range(0, len(new), 1024):
        chunk = new[start : start + 1024]
        out[len(base) + start : len(base) + start + len(chunk)] = chunk
    out.flush()
    shape = tuple(int(s) for s in out.shape)
    del out, base, new
    os.replace(tmp, new_file)
    return shape  # type: ignore[return-value]


__all__ = ["BuildResult", "BuiltIndex", "MrisError", "build_faiss_index", "build_index_bundle"]
