"""Check an index bundle, and measure recall (the role of autofaiss's ``metrics/recalls.py``).

``verify_bundle`` checks, in order: the card; every file against its sha256 and size; that no
unlisted file sits in the bundle; the counts (rows.csv, embeddings, each FAISS index and each
maps array agree with the card); the encoders (when a model bundle is given); and
self-retrieval: every stored embedding, used as a query, finds its own row at rank 1.

Duplicates and ties: two rows may hold the same embedding (the same map twice, e.g. a repeated
scan). FAISS then returns either first. A row passes self-retrieval when the rank-1 similarity
equals its own self-similarity within ``TIE_TOLERANCE`` and the row itself is among the results
tied with rank 1 (searched with a few extra slots). For a lossy kind (ivfpq) self-retrieval is
reported as a rate and passes at >= 0.9.

``measure_recall`` is recall@k of an index against exact inner-product search, on queries built
like radiograph embeddings: stored embeddings plus Gaussian noise, renormalised, at a cosine of
about 0.8 to their source (a radiograph lands near, not on, its own map's embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mris.errors import BundleInvalid, MrisError
from mris.fsutil import sha256_file
from mris.index.card import CARD_NAME, IndexCard, check_encoders, read_card
from mris.index.faiss_io import read_index, set_nprobe
from mris.index.rows import ROWS_NAME, read_rows

TIE_TOLERANCE = 1e-5
LOSSY_SELF_RATE = 0.9
QUERY_COSINE = 0.8


@dataclass
class VerifyReport:
    path: Path
    card: IndexCard
    checks: list[str] = field(default_factory=list)
    self_retrieval: dict[str, float] = field(default_factory=dict)


def perturbed_queries(
    embeddings: np.ndarray, n: int, seed: int = 0, cosine: float = QUERY_COSINE
) -> np.ndarray:
    """``n`` radiograph-like queries: sampled rows plus isotropic noise, unit norm, with an
    expected cosine of ``cosine`` to their source row."""
    rng = np.random.default_rng(seed)
    rows, dim = embeddings.shape
    picks = rng.choice(rows, size=min(n, rows), replace=False)
    sigma = np.sqrt((1.0 / cosine**2 - 1.0) / dim)
    queries = np.asarray(embeddings[np.sort(picks)], dtype=np.float32) + rng.normal(
        0, sigma, (len(picks), dim)
    ).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries


def exact_top_k(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k ids with FAISS's flat index (ground truth)."""
    import faiss

    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return flat.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k."""
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def measure_recall(
    index,
    embeddings: np.ndarray,
    k: int = 20,
    n_queries: int = 1000,
    seed: int = 0,
    truth: np.ndarray | None = None,
    queries: np.ndarray | None = None,
) -> tuple[float, int]:
    """recall@k of ``index`` vs exact search; returns (recall, number of queries)."""
    k = min(k, embeddings.shape[0])
    if queries is None:
        queries = perturbed_queries(embeddings, n_queries, seed)
    if truth is None:
        truth = exact_top_k(embeddings, queries, k)
    found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)[1]
    return recall_at_k(found, truth), len(queries)


def self_retrieval_failures(
    index, embeddings: np.ndarray, batch: int = 4096, extra: int = 4
) -> np.ndarray:
    """Rows whose own embedding does not find them at rank 1 (ties with rank 1 allowed)."""
    rows = embeddings.shape[0]
    k = min(rows, 1 + extra)
    failures = []
    for start in range(0, rows, batch):
        query = np.ascontiguousarray(embeddings[start : start + batch], dtype=np.float32)
        similarities, ids = index.search(query, k)
        own = np.arange(start, start + len(query))
        self_sim = np.einsum("nd,nd->n", query, query)
        at_top = ids[:, 0] == own
        tied = (np.abs(similarities - similarities[:, :1]) <= TIE_TOLERANCE) & (ids == own[:, None])
        ok = at_top | (tied.any(axis=1) & (similarities[:, 0] <= self_sim + TIE_TOLERANCE))
        failures.extend(own[~ok].tolist())
    return np.asarray(failures, dtype=np.int64)


def verify_bundle(path: str | Path, model_card=None, self_retrieval: bool = True) -> VerifyReport:
    """Raise ``BundleInvalid`` (or ``BundleMismatch``) at the first failed check; return the
    report of passed checks otherwise."""
    path = Path(path)
    card = read_card(path)
    report = VerifyReport(path=path, card=card)
    report.checks.append(f"card: format {card.format}, variant {card.variant}, {card.rows} rows")

    bad = []
    for name, digest in sorted(card.files.items()):
        file = path / name
        if not file.is_file():
            bad.append(f"{name} missing")
        elif file.stat().st_size != card.sizes.get(name, -1):
            bad.append(f"{name} size differs")
        elif sha256_file(file) != digest:
            bad.append(f"{name} sha256 differs")
    if bad:
        raise BundleInvalid(f"index bundle {path} failed checksums: " + "; ".join(bad))
    unlisted = sorted(
        str(p.relative_to(path))
        for p in path.rglob("*")
        if p.is_file() and p.name != CARD_NAME and str(p.relative_to(path)) not in card.files
    )
    if unlisted:
        raise BundleInvalid(f"index bundle {path} holds unlisted file(s): {', '.join(unlisted)}")
    report.checks.append(f"checksums: {len(card.files)} files match")

    rows = read_rows(path / ROWS_NAME)
    if len(rows) != card.rows or [r.row for r in rows] != list(range(card.rows)):
        raise BundleInvalid(f"index bundle {path}: rows.csv does not hold rows 0..{card.rows - 1}")
    if len({r.pair_id for r in rows}) != len(rows):
        raise BundleInvalid(f"index bundle {path}: duplicate pair_id in rows.csv")
    for _cartilage, maps in card.maps.items():
        array = np.load(path / maps.file, mmap_mode="r")
        if (
            array.shape != tuple(maps.shape)
            or array.shape[0] != card.rows
            or str(array.dtype) != maps.dtype
        ):
            raise BundleInvalid(
                f"index bundle {path}: {maps.file} is {array.shape} {array.dtype}, card says "
                f"{maps.shape} {maps.dtype}"
            )
    embeddings = {}
    indexes = {}
    for region, region_card in card.regions.items():
        emb = np.load(path / region_card.embeddings_file, mmap_mode="r")
        if emb.shape != (card.rows, card.embedding_dim) or emb.dtype != np.float32:
            raise BundleInvalid(
                f"index bundle {path}: {region_card.embeddings_file} is {emb.shape} {emb.dtype}"
            )
        index, _ = read_index(path / region_card.index_file)
        if index.ntotal != card.rows or index.d != card.embedding_dim:
            raise BundleInvalid(
                f"index bundle {path}: {region_card.index_file} holds {index.ntotal} x {index.d}"
            )
        set_nprobe(index, region_card.nprobe)
        embeddings[region], indexes[region] = emb, index
    report.checks.append(f"counts: {card.rows} rows in rows.csv, embeddings, indexes and maps")

    if model_card is not None:
        check_encoders(card, model_card)
        report.checks.append("encoders: the model bundle's encoders match the card")

    if self_retrieval:
        for region, index in indexes.items():
            failures = self_retrieval_failures(index, embeddings[region])
            rate = 1.0 - len(failures) / card.rows
            report.self_retrieval[region] = rate
            required = 1.0 if card.regions[region].exact else LOSSY_SELF_RATE
            if rate < required:
                shown = ", ".join(rows[i].pair_id for i in failures[:10])
                raise BundleInvalid(
                    f"index bundle {path}: self-retrieval failed for {len(failures)} of "
                    f"{card.rows} rows "
                    f"in region {region} (e.g. {shown})"
                )
        report.checks.append(
            "self-retrieval: "
            + ", ".join(f"{r} {rate:.4f}" for r, rate in report.self_retrieval.items())
        )
    return report


def check_not_empty(rows: int) -> None:
    if rows < 1:
        raise MrisError("an index needs at least one row")
