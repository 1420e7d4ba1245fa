"""Per-query retrieval + synthesis: the reference code's step versus ours, same database.

Reference (the MRIS code's evaluation loop): similarities by ``np.dot`` against the whole
database, a full ``np.argsort``, then the 20 neighbour maps loaded from their separate ``.npy``
files and each resized (anti-aliased, ``mris.imageops.resize``; the reference uses skimage's
resize) to the output size before the weighted average.

Ours: ``IndexBundle.synthesize`` — FAISS ``IndexFlatIP`` top-20, the 20 rows read from the
bundle's maps array (``os.preadv`` per row; or resident with ``--resident``), and eq. 4 with the
NaN rule, at the stored resolution (maps are stored once, at the output size, at build time).

Database: ``--rows`` (20k) rows of structured embeddings (the scale benchmark's mixture) and
maps of ``--map-px`` (310, the atlas grid) made by ``tests/bundle_factory.tiny_map``. To spare
the disk, the reference side has ``--files`` (2,000) distinct .npy files and row i uses file
i mod files; the bundle stores all rows. Both sides compute the same neighbours.

    python benchmarks/bench_vs_reference.py --rows 20000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--files", type=int, default=2_000)
    parser.add_argument("--map-px", type=int, default=310)
    parser.add_argument(
        "--reference-px", type=int, default=256, help="size the reference resizes each map to"
    )
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument(
        "--resident", action="store_true", help="load our maps into RAM (the service's choice)"
    )
    parser.add_argument(
        "--workdir", help="keep the data here (default: a temporary folder, removed)"
    )
    args = parser.parse_args()

    import faiss
    from bench_index_scale import mixture_embeddings
    from bundle_factory import tiny_map

    from mris.imageops import resize
    from mris.index.bundle import MapStore
    from mris.synthesis import similarity_weights, synthesize

    # one FAISS thread: for single queries OpenMP start-up costs more than it saves on 2 shared
    # cores
    faiss.omp_set_num_threads(1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mris-bench-ref-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rng = np.random.default_rng(0)
        both = mixture_embeddings(args.rows + args.queries, seed=3)
        database, queries = both[: args.rows], both[args.rows :]
        shape = (args.map_px, args.map_px)
        print(
            f"writing {args.files} map files and a {args.rows} x {shape[0]} x {shape[1]} "
            "float32 maps array ...",
            flush=True,
        )
        maps_dir = work / "maps"
        maps_dir.mkdir(exist_ok=True)
        distinct = [tiny_map(rng, shape) for _ in range(min(args.files, args.rows))]
        for i, m in enumerate(distinct):
            np.save(maps_dir / f"{i:06d}.npy", m)
        array = np.lib.format.open_memmap(
            work / "maps-fc.npy", mode="w+", dtype=np.float32, shape=(args.rows, *shape)
        )
        for i in range(args.rows):
            array[i] = distinct[i % len(distinct)]
        array.flush()
        del array
        store = MapStore(work / "maps-fc.npy", resident=args.resident)
        index = faiss.IndexFlatIP(database.shape[1])
        index.add(database)

        def reference(query: np.ndarray) -> np.ndarray:
            similarities = np.dot(database, query)
            order = np.argsort(-similarities)[:20]
            weights = similarities[order] / similarities[order].sum()
            out = np.zeros((args.reference_px, args.reference_px), np.float64)
            for weight, row in zip(weights, order):
                m = np.load(maps_dir / f"{row % len(distinct):06d}.npy")
                out += weight * resize(np.nan_to_num(m), (args.reference_px, args.reference_px))
            return out

        def ours(query: np.ndarray):
            similarities, ids = index.search(query[None], 20)
            return synthesize(store.rows(ids), similarities)

        # same neighbours on both sides
        for q in queries[:5]:
            ref_ids = np.argsort(-np.dot(database, q))[:20]
            assert set(ref_ids.tolist()) == set(index.search(q[None], 20)[1][0].tolist())
        for q in queries[:3]:  # warm-up
            reference(q), ours(q)
        timings = {}
        for name, step in (("reference", reference), ("ours", ours)):
            times = []
            for q in queries:
                t = time.perf_counter()
                step(q)
                times.append(time.perf_counter() - t)
            timings[name] = 1000 * float(np.median(times))
        # the parts of the reference step
        q = queries[0]
        t = time.perf_counter()
        sims = np.dot(database, q)
        t_dot = time.perf_counter() - t
        t = time.perf_counter()
        order = np.argsort(-sims)[:20]
        t_sort = time.perf_counter() - t
        t = time.perf_counter()
        loaded = [np.load(maps_dir / f"{r % len(distinct):06d}.npy") for r in order]
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        [resize(np.nan_to_num(m), (args.reference_px,) * 2) for m in loaded]
        t_resize = time.perf_counter() - t
        t = time.perf_counter()
        sims2, ids = index.search(q[None], 20)
        t_search = time.perf_counter() - t
        t = time.perf_counter()
        rows = store.rows(ids)
        t_rows = time.perf_counter() - t
        t = time.perf_counter()
        synthesize(rows, sims2)
        t_syn = time.perf_counter() - t
        print(
            f"database {args.rows} rows, maps {shape[0]}x{shape[1]}, {args.queries} queries, "
            f"maps {'resident' if args.resident else 'preadv rows'}"
        )
        print(
            f"reference: {timings['reference']:.2f} ms/query (dot {1000 * t_dot:.2f}, "
            f"argsort {1000 * t_sort:.2f}, load 20 .npy {1000 * t_load:.2f}, resize 20 "
            f"{1000 * t_resize:.2f})"
        )
        print(
            f"ours:      {timings['ours']:.2f} ms/query (faiss top-20 {1000 * t_search:.2f}, "
            f"read 20 rows {1000 * t_rows:.2f}, eq. 4 + NaN rule + std {1000 * t_syn:.2f})"
        )
        print(f"speedup:   x{timings['reference'] / timings['ours']:.1f}")
        _ = similarity_weights
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
