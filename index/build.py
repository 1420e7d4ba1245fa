"""Build FAISS indexes and whole index bundles (autofaiss's ``indices/build.py`` role).

``build_faiss_index`` turns L2-normalised embeddings and an ``IndexSpec`` (``choose.py``) into a
CPU FAISS index, tuning ``nprobe`` for IVF kinds to the smallest value whose recall@20 against
exact search reaches the target, and returns the measured recall.

``build_index_bundle`` is the whole ``mris index build``, a sequence of named stages:

1. ``load_inputs``: load and verify the model bundle (sha256 of every file), read the manifest,
   select the rows; with ``append_from`` load the base bundle (``BaseBundle``) and refuse it
   unless its encoders are these; check every map file exists (the full list of missing ones,
   or skip them) -> ``BuildInputs``;
2. ``start_building``: ``INDEX_ROOT/.building-<version>-<pid>/`` (stale ones of dead processes
   removed first);
3. ``embed_new_rows``: stream maps -> embeddings (``embed.py``) while writing the maps arrays
   (``maps.MapsWriter``) -> ``NewRows``;
4. ``join_base``: with a base bundle, its rows, embeddings and maps first -> ``BundleRows``
   (``rows.csv`` written);
5. ``write_indexes``: each region's embeddings and FAISS index -> ``RegionCard`` per region;
6. ``write_card``: card and checksums -> ``IndexCard``;
7. ``verify_bundle`` (``verify.py``), rename the folder to ``<version>`` and with ``publish``
   flip ``current`` (``publish.py``).

Any failure or interruption removes the building folder; ``current`` is only ever touched by the
final flip.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mris.constants import CARTILAGES, PREPROCESSING_VERSION
from mris.encoders import OnnxEncoder, default_threads
from mris.errors import BadParameter, BundleMismatch, ManifestError, MrisError
from mris.fsutil import atomic_save_npy, atomic_write_json, fsync_dir, sha256_file
from mris.index import publish as publishing
from mris.index.card import (
    CARD_NAME,
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
from mris.index.choose import DEFAULT_MEMORY_BUDGET_BYTES, IndexSpec, choose_index
from mris.index.embed import EmbeddedRows, embed_rows, find_missing
from mris.index.faiss_io import set_faiss_threads, write_index
from mris.index.maps import MAPS_DTYPES, MapsWriter, prepend_maps
from mris.index.rows import ROWS_NAME, RowMeta, read_rows, write_rows
from mris.index.verify import exact_top_k, perturbed_queries, recall_at_k, verify_bundle
from mris.manifest import Manifest, ManifestRow, read_manifest
from mris.model_bundle import VARIANT_REGIONS, ModelBundle, load_model_bundle

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


def build_faiss_index(
    embeddings: np.ndarray, spec: IndexSpec, seed: int = 0, recall_queries: int = RECALL_QUERIES
) -> BuiltIndex:
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
    train = (
        embeddings
        if spec.train_rows >= rows
        else embeddings[np.sort(rng.choice(rows, spec.train_rows, replace=False))]
    )
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
        recall_method=f"{len(queries)} stored embeddings + noise (cosine ~0.8) "
        "vs exact IndexFlatIP",
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


@dataclass
class BaseBundle:
    """The published version an appended build starts from."""

    path: Path
    card: IndexCard
    rows: list[RowMeta]


@dataclass(frozen=True)
class EngineOptions:
    """Where stage 3 runs: ``local`` (this process) or ``ray`` (``mris.index.ray_embed``: a Ray
    cluster at ``ray_address``, or a local one, with ``actors`` encoder actors)."""

    kind: str = "local"
    ray_address: str | None = None
    actors: int = 2
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass
class BuildInputs:
    """What ``load_inputs`` decided: the model, the manifest rows to embed, what was skipped."""

    model: ModelBundle
    manifest: Manifest
    manifest_path: Path
    model_dir: Path
    splits: list[str]
    variant: str
    regions: list[str]
    maps_dtype: str
    rows: list[ManifestRow]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    base: BaseBundle | None = None


@dataclass
class NewRows:
    """The embedded rows of this build (unusable maps dropped), their maps written."""

    rows: list[ManifestRow]
    embeddings: dict[str, np.ndarray]  # region -> float32 [rows, d]
    map_shapes: dict[str, tuple[int, int, int]]  # cartilage -> (rows, H, W)
    seconds: float


@dataclass
class BundleRows:
    """Every row of the new version (a base bundle's first), as written to ``rows.csv``."""

    metas: list[RowMeta]
    embeddings: dict[str, np.ndarray]
    map_shapes: dict[str, tuple[int, int, int]]
    new_rows: int
    reused_rows: int


def _versions() -> dict[str, str]:
    import faiss
    import onnxruntime

    import mris

    return {
        "faiss": faiss.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "mris": mris.__version__,
    }


def load_inputs(
    model_dir: str | Path,
    manifest_path: str | Path,
    root: Path,
    *,
    splits: Sequence[str],
    variant: str,
    maps_dtype: str,
    append_from: str | None,
    skip_missing: bool,
) -> BuildInputs:
    """Stage 1: check the options, load the model bundle and the manifest, select the rows
    (less those a base bundle holds), and find missing map files (refused, or skipped)."""
    if variant not in VARIANT_REGIONS:
        raise BadParameter(f"--variant must be separate or combined, got {variant!r}")
    if maps_dtype not in MAPS_DTYPES:
        raise BadParameter(
            f"--maps-dtype must be one of {', '.join(MAPS_DTYPES)}, got {maps_dtype!r}"
        )
    model = load_model_bundle(model_dir)  # BundleInvalid when incomplete or not matching its card
    if variant not in model.card.variants:
        raise BadParameter(f"model bundle {model_dir} has no '{variant}' variant")
    manifest = read_manifest(manifest_path)  # ManifestError when missing or malformed
    rows = manifest.select(list(splits))
    if not rows:
        raise ManifestError(
            f"manifest {manifest_path} has no rows for split(s) {', '.join(splits)}"
        )
    inputs = BuildInputs(
        model=model,
        manifest=manifest,
        manifest_path=Path(manifest_path),
        model_dir=Path(model_dir),
        splits=list(splits),
        variant=variant,
        regions=list(model.card.variants[variant].regions),
        maps_dtype=maps_dtype,
        rows=rows,
    )
    if append_from is not None:
        inputs.base = load_base(root, append_from, inputs)
        known = {row.pair_id for row in inputs.base.rows}
        inputs.rows = [row for row in inputs.rows if row.pair_id not in known]
        if not inputs.rows:
            raise ManifestError(
                "nothing to append: every selected manifest row is already in "
                f"{inputs.base.card.version}"
            )
    drop_missing(inputs, skip_missing)
    return inputs


def load_base(root: Path, append_from: str, inputs: BuildInputs) -> BaseBundle:
    """The bundle ``append_from`` names (relative to ``root`` unless absolute); refused unless
    it is this variant, built with these encoders, with this maps dtype."""
    given = Path(append_from)
    path = publishing.resolve(given if given.is_absolute() else root / append_from)
    card = read_card(path)
    if card.variant != inputs.variant:
        raise BundleMismatch(
            f"cannot append: {card.version} is variant '{card.variant}', not '{inputs.variant}'"
        )
    try:
        check_encoders(card, inputs.model.card)
    except BundleMismatch as exc:
        raise BundleMismatch(f"cannot append: {exc.detail}; rebuild from scratch instead") from exc
    if card.maps["fc"].dtype != inputs.maps_dtype:
        raise BadParameter(
            f"cannot append: {card.version} stores maps as {card.maps['fc'].dtype}, "
            f"asked {inputs.maps_dtype}"
        )
    return BaseBundle(path=path, card=card, rows=read_rows(path / ROWS_NAME))


def drop_missing(inputs: BuildInputs, skip_missing: bool) -> None:
    """Refuse rows whose map files are missing (all listed), or with ``skip_missing`` drop them
    into ``inputs.skipped["missing"]``."""
    missing = find_missing(inputs.manifest, inputs.rows)
    if not missing:
        return
    if not skip_missing:
        shown = "; ".join(f"{pair}: {path}" for pair, path in missing[:20])
        more = f" (and {len(missing) - 20} more)" if len(missing) > 20 else ""
        raise ManifestError(
            f"{len(missing)} map file(s) missing: {shown}{more} (or pass --skip-missing)"
        )
    bad = {pair for pair, _ in missing}
    inputs.skipped["missing"] = sorted(bad)
    inputs.rows = [row for row in inputs.rows if row.pair_id not in bad]
    if not inputs.rows:
        raise ManifestError("every selected row has a missing map file")


def start_building(root: Path) -> tuple[str, Path]:
    """Stage 2: a new version name and its empty building folder under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    publishing.remove_stale_builds(root)
    version = publishing.new_version_name()
    building = publishing.building_dir(root, version)
    building.mkdir()
    return version, building


def embed_new_rows(
    inputs: BuildInputs,
    building: Path,
    *,
    device: str,
    threads: int,
    batch_size: int,
    skip_bad: bool,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
    engine: EngineOptions | None = None,
) -> NewRows:
    """Stage 3: embed ``inputs.rows`` with the thickness encoders while writing their maps into
    ``building``; unusable maps are skipped (``skip_bad``) into ``inputs.skipped``. With an
    ``engine`` of kind ``ray`` the rows are embedded by Ray actors (``ray_embed``)."""
    encoders = {
        region: OnnxEncoder(
            inputs.model.encoder_path(inputs.variant, region, "thickness"),
            device=device,
            intra_op_threads=threads,
            batch_size=batch_size,
        )
        for region in inputs.regions
    }
    n_new = len(inputs.rows)
    writers = {c: MapsWriter(building / maps_name(c), n_new, inputs.maps_dtype) for c in CARTILAGES}

    def on_maps(i: int, fc: np.ndarray, tc: np.ndarray) -> None:
        writers["fc"].write(i, fc)
        writers["tc"].write(i, tc)

    if on_start is not None:
        on_start(n_new)
    if engine is not None and engine.kind == "ray":
        from mris.index.ray_embed import embed_rows_ray

        streamed: EmbeddedRows = embed_rows_ray(
            str(inputs.manifest_path),
            inputs.rows,
            str(inputs.model_dir),
            inputs.variant,
            {region: encoder.embedding_dim or 512 for region, encoder in encoders.items()},
            on_maps=on_maps,
            skip_bad=skip_bad,
            batch_size=batch_size,
            on_progress=on_progress,
            ray_address=engine.ray_address,
            actors=engine.actors,
            cpus_per_actor=engine.cpus_per_actor,
            gpus_per_actor=engine.gpus_per_actor,
        )
    else:
        streamed = embed_rows(
            inputs.manifest,
            inputs.rows,
            encoders,
            inputs.variant,
            inputs.model.card.preprocess_config,
            on_maps=on_maps,
            skip_bad=skip_bad,
            batch_size=batch_size,
            on_progress=on_progress,
        )
    for reason, pairs in streamed.skipped.items():
        inputs.skipped.setdefault(reason, []).extend(pairs)
    keep = streamed.keep
    if not keep.any():
        raise ManifestError("no usable thickness map among the selected rows")
    return NewRows(
        rows=[row for row, kept in zip(inputs.rows, keep) if kept],
        embeddings={region: streamed.embeddings[region][keep] for region in inputs.regions},
        map_shapes={c: writers[c].finish(keep) for c in CARTILAGES},
        seconds=streamed.seconds,
    )


def join_base(inputs: BuildInputs, new: NewRows, building: Path) -> BundleRows:
    """Stage 4: the version's rows — a base bundle's (its maps and embeddings first), then the
    new ones — written to ``rows.csv``."""
    base = inputs.base
    map_shapes, embeddings = new.map_shapes, new.embeddings
    base_rows: list[RowMeta] = []
    if base is not None:
        base_shape = tuple(base.card.maps["fc"].shape[1:])
        if tuple(map_shapes["fc"][1:]) != base_shape:
            raise BadParameter(
                f"cannot append: new maps are {map_shapes['fc'][1:]}, "
                f"{base.card.version} holds {base_shape}"
            )
        map_shapes = {
            c: prepend_maps(base.path / maps_name(c), building / maps_name(c)) for c in CARTILAGES
        }
        embeddings = {
            region: np.concatenate(
                [np.load(base.path / embeddings_name(region)), embeddings[region]]
            )
            for region in inputs.regions
        }
        base_rows = base.rows
    metas = list(base_rows) + [
        RowMeta(
            len(base_rows) + i, r.pair_id, r.subject_id, r.side, r.visit_month, r.klg, r.progressor
        )
        for i, r in enumerate(new.rows)
    ]
    write_rows(building / ROWS_NAME, metas)
    return BundleRows(
        metas=metas,
        embeddings=embeddings,
        map_shapes=map_shapes,
        new_rows=len(new.rows),
        reused_rows=len(base_rows),
    )


def write_indexes(
    inputs: BuildInputs,
    table: BundleRows,
    building: Path,
    *,
    kind: str,
    memory_budget_bytes: int,
) -> dict[str, RegionCard]:
    """Stage 5: each region's embeddings and FAISS index (kind chosen by ``choose_index``, nprobe
    tuned by ``build_faiss_index``), described by its ``RegionCard``."""
    model_card = inputs.model.card
    total = len(table.metas)
    dim = table.embeddings[inputs.regions[0]].shape[1]
    region_cards = {}
    for region in inputs.regions:
        atomic_save_npy(building / embeddings_name(region), table.embeddings[region])
        spec = choose_index(total, dim, kind=kind, memory_budget_bytes=memory_budget_bytes)
        built = build_faiss_index(table.embeddings[region], spec)
        write_index(built.index, building / index_name(region))
        pair = model_card.variants[inputs.variant].regions[region]
        region_cards[region] = RegionCard(
            thickness_encoder=pair.thickness,
            thickness_encoder_sha256=model_card.files[pair.thickness],
            radiograph_encoder=pair.radiograph,
            radiograph_encoder_sha256=model_card.files[pair.radiograph],
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
    return region_cards


def write_card(
    inputs: BuildInputs,
    table: BundleRows,
    region_cards: dict[str, RegionCard],
    building: Path,
    version: str,
    started: float,
) -> IndexCard:
    """Stage 6: the card (with every file's sha256 and size) written last; the folder made
    readable for a service user and synced."""
    model_card = inputs.model.card
    files = sorted(p.name for p in building.iterdir() if p.is_file())
    source: dict[str, Any] = {
        "manifest": str(inputs.manifest_path.resolve()),
        "splits": inputs.splits,
        "model_dir": str(inputs.model_dir.resolve()),
        "new_rows": table.new_rows,
        "skipped": {reason: len(pairs) for reason, pairs in inputs.skipped.items()},
        "skipped_pair_ids": {reason: pairs[:100] for reason, pairs in inputs.skipped.items()},
    }
    if inputs.base is not None:
        source.update(appended_from=inputs.base.card.version, reused_rows=table.reused_rows)
    card = IndexCard(
        version=version,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        build_seconds=round(time.perf_counter() - started, 3),
        variant=inputs.variant,
        rows=len(table.metas),
        embedding_dim=table.embeddings[inputs.regions[0]].shape[1],
        preprocess=model_card.preprocess,
        preprocessing_version=PREPROCESSING_VERSION,
        preprocess_fingerprint=model_card.preprocess_config.fingerprint(),
        regions=region_cards,
        maps={
            c: MapsCard(file=maps_name(c), shape=table.map_shapes[c], dtype=inputs.maps_dtype)
            for c in CARTILAGES
        },
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
    return card


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
    engine: EngineOptions | None = None,
) -> BuildResult:
    """Build (and optionally publish) a new index bundle version under ``root``; ``engine``
    says where the maps are embedded (default: this process)."""
    started = time.perf_counter()
    root = Path(root)
    inputs = load_inputs(
        model_dir,
        manifest_path,
        root,
        splits=splits,
        variant=variant,
        maps_dtype=maps_dtype,
        append_from=append_from,
        skip_missing=skip_missing,
    )
    version, building = start_building(root)
    try:
        threads = threads or default_threads()
        set_faiss_threads(threads)
        new = embed_new_rows(
            inputs,
            building,
            device=device,
            threads=threads,
            batch_size=batch_size,
            skip_bad=skip_missing,
            on_start=on_start,
            on_progress=on_progress,
            engine=engine,
        )
        table = join_base(inputs, new, building)
        region_cards = write_indexes(
            inputs, table, building, kind=kind, memory_budget_bytes=memory_budget_bytes
        )
        card = write_card(inputs, table, region_cards, building, version, started)
        verify_bundle(building, model_card=inputs.model.card)
        final = publishing.finalize(building, root, version)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    if publish:
        publishing.publish(root, version)
    return BuildResult(
        version=version,
        path=final,
        rows=card.rows,
        new_rows=table.new_rows,
        reused_rows=table.reused_rows,
        skipped=inputs.skipped,
        seconds=time.perf_counter() - started,
        embed_seconds=new.seconds,
        size_bytes=publishing.dir_size(final),
        published=publish,
        card=card,
    )


__all__ = [
    "BaseBundle",
    "BuildInputs",
    "BuildResult",
    "BuiltIndex",
    "BundleRows",
    "EngineOptions",
    "MrisError",
    "NewRows",
    "build_faiss_index",
    "build_index_bundle",
    "drop_missing",
    "embed_new_rows",
    "join_base",
    "load_base",
    "load_inputs",
    "set_faiss_threads",
    "start_building",
    "write_card",
    "write_indexes",
]
