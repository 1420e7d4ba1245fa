"""Index scale benchmark: flat (exact) vs the approximate kind ``choose.py`` picks, at 20k, 200k
and 1M rows of 512-d embeddings with neighbourhood structure.

Structure: with ``--seed-embeddings E.npy`` (e.g. a bundle's ``embeddings-fc.npy``) the
database is grown from those rows by small perturbations (each new row = a random seed row plus
Gaussian noise at cosine ~0.95 to it, renormalised). Without, rows come from a Gaussian mixture in
a 32-d latent space (``--clusters`` components, anisotropic spreads) mapped linearly to 512-d plus
isotropic noise and L2-normalised: clusters of knees with a low intrinsic dimension, as trained
embeddings have. Random unit vectors are NOT used: they have no neighbourhood structure.

Queries (``--queries``, default 500) are fresh draws, not database rows, at cosine ~0.8 to a
database row (a radiograph lands near, not on, its map). recall@20 is against exact
``IndexFlatIP`` on the same queries; the nprobe tuning inside ``build_faiss_index`` uses a
different query sample. Latency: median over single queries, and per query in batches of 16.

    python benchmarks/bench_index_scale.py --sizes 20000 200000 1000000 --max-rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np


def mixture_embeddings(
    rows: int, dim: int = 512, latent: int = 32, clusters: int = 2048, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    projection = rng.normal(0, 1 / np.sqrt(latent), (latent, dim)).astype(np.float32)
    centres = rng.normal(0, 1, (clusters, latent)).astype(np.float32)
    spreads = rng.uniform(0.5, 1.0, (clusters, latent)).astype(np.float32)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        which = rng.integers(0, clusters, n)
        z = centres[which] + spreads[which] * rng.standard_normal((n, latent), dtype=np.float32)
        x = z @ projection + rng.normal(0, 0.02, (n, dim)).astype(np.float32)
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def grown_embeddings(
    seed_rows: np.ndarray, rows: int, cosine: float = 0.95, seed: int = 0
) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dim = seed_rows.shape[1]
    sigma = np.sqrt((1 / cosine**2 - 1) / dim)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        x = seed_rows[rng.integers(0, len(seed_rows), n)] + rng.normal(0, sigma, (n, dim)).astype(
            np.float32
        )
        out[start : start + n] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def latency(index, queries: np.ndarray, k: int = 20) -> tuple[float, float]:
    """(median ms for one query, ms per query in batches of 16)."""
    singles = []
    for q in queries[:30]:
        t = time.perf_counter()
        index.search(q[None], k)
        singles.append(time.perf_counter() - t)
    batches = []
    for start in range(0, min(len(queries), 160), 16):
        t = time.perf_counter()
        index.search(queries[start : start + 16], k)
        batches.append((time.perf_counter() - t) / 16)
    return 1000 * float(np.median(singles)), 1000 * float(np.median(batches))


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    parser.add_argument(
        "--max-rows", type=int, default=1_000_000, help="skip sizes above this (fit the machine)"
    )
    parser.add_argument(
        "--seed-embeddings", help="grow the database from these real embeddings (.npy [n, 512])"
    )
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument(
        "--kind",
        default="auto",
        help="approximate kind to compare (auto picks by size; ivf forces IVF)",
    )
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    import faiss

    from mris.index.build import build_faiss_index
    from mris.index.choose import choose_index
    from mris.index.verify import recall_at_k

    threads = args.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    seed_rows = np.load(args.seed_embeddings).astype(np.float32) if args.seed_embeddings else None
    results = []
    print(
        f"threads {threads}; structure: "
        f"""{
            "grown from " + args.seed_embeddings
            if seed_rows is not None
            else "Gaussian mixture (32-d latent)"
        }"""
    )
    for size in sorted(args.sizes):
        if size > args.max_rows:
            print(f"skip {size} rows (> --max-rows {args.max_rows})")
            continue
        t = time.perf_counter()
        if seed_rows is not None:
            database = grown_embeddings(seed_rows, size, seed=size)
            queries = grown_embeddings(seed_rows, args.queries, cosine=0.8, seed=size + 1)
        else:
            both = mixture_embeddings(size + args.queries, seed=size)
            database, fresh = both[:size], both[size:]
            noise = (
                np.random.default_rng(1)
                .normal(0, np.sqrt((1 / 0.8**2 - 1) / 512), fresh.shape)
                .astype(np.float32)
            )
            queries = fresh + noise
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        generated = time.perf_counter() - t

        t = time.perf_counter()
        flat = build_faiss_index(database, choose_index(size, kind="flat")).index
        flat_build = time.perf_counter() - t
        truth = flat.search(queries, 20)[1]
        flat_1, flat_16 = latency(flat, queries)
        kind = args.kind
        if kind == "auto" and size < 100_000:
            kind = "ivf"  # auto would pick flat below 100k rows; compare IVF anyway
        spec = choose_index(size, kind=kind)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        built = build_faiss_index(database, spec, recall_queries=min(1000, size // 10))
        approx_build = time.perf_counter() - t
        recall = recall_at_k(built.index.search(queries, 20)[1], truth)
        approx_1, approx_16 = latency(built.index, queries)
        row = {
            "rows": size,
            "generate_s": round(generated, 1),
            "flat": {
                "build_s": round(flat_build, 2),
                "bytes": index_bytes(flat),
                "ms_1": round(flat_1, 2),
                "ms_per_query_16": round(flat_16, 3),
            },
            "approx": {
                "factory": spec.factory,
                "nprobe": built.nprobe,
                "build_s": round(approx_build, 1),
                "bytes": index_bytes(built.index),
                "ms_1": round(approx_1, 2),
                "ms_per_query_16": round(approx_16, 3),
                "recall_at_20_tuning": round(built.recall_at_20, 4),
                "recall_at_20_fresh": round(recall, 4),
            },
            "speedup_1": round(flat_1 / approx_1, 1),
            "speedup_16": round(flat_16 / approx_16, 1),
            "max_rss_mib": round(
                max(rss_before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
            ),
        }
        results.append(row)
        print(
            f"{size:>8} rows | flat: build {flat_build:5.1f} s, "
            f"{row['flat']['bytes'] / 2**20:7.0f} MiB, "
            f"1 query {flat_1:7.2f} ms, {flat_16:6.3f} ms/query@16 | {spec.factory} nprobe "
            f"{built.nprobe}: "
            f"build {approx_build:5.1f} s, {row['approx']['bytes'] / 2**20:7.0f} MiB, 1 "
            f"query {approx_1:6.2f} ms, "
            f"{approx_16:6.3f} ms/query@16, recall@20 {recall:.4f} | speedup "
            f"x{row['speedup_1']} (1), x{row['speedup_16']} (16)",
            flush=True,
        )
        del database, flat, built
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    sys.exit(main())
