"""Choose the FAISS index kind and its parameters from the database size and a memory budget
(the role of autofaiss's ``external/optimize.py``).

Kinds (all over L2-normalised float32 embeddings with inner-product metric, so scores are
cosine similarities):

- ``flat``  — ``IndexFlatIP``: exact, as in the paper. Search cost grows linearly: on our 2-core
  CPU about 3 ms per query at 20k rows, 30 ms at 200k, 170 ms at 1M (PERF_FACTS.md).
- ``ivf``   — ``IVF{nlist},Flat`` (inner product): exact vectors in ``nlist`` k-means cells, a
  query scans the ``nprobe`` nearest cells. ``nprobe`` is tuned at build time to reach the
  target recall@20 against exact search, and the measured recall goes into the card.
- ``ivfpq`` — ``IVF{nlist},PQ{m}`` for databases whose raw vectors exceed the memory budget;
  lossy (recall and self-retrieval are measured and reported, not guaranteed).

``auto``: ``flat`` below ``FLAT_MAX_ROWS`` rows (100k: an exact search there stays under ~15 ms
per query on 2 cores, below the encoder's ~21 ms), ``ivf`` above while the raw vectors fit the
memory budget, ``ivfpq`` beyond. HNSW is not offered: on 2 cores it builds 200k rows in ~2
minutes and 1M in over 10 (PERF_FACTS.md), it cannot be memory-mapped, and IVF reaches the
recall goal at a fraction of the build time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from mris.errors import MrisError

KINDS = ("auto", "flat", "ivf", "ivfpq")
FLAT_MAX_ROWS = 100_000
TARGET_RECALL = 0.99
# nprobe is tuned to this on the tuning sample: a margin over TARGET_RECALL so a fresh query
# sample still reaches the target (the tuning sample is finite).
TUNING_RECALL = 0.995
DEFAULT_MEMORY_BUDGET_BYTES = 16 << 30


@dataclass
class IndexSpec:
    """What to build. ``factory`` is a ``faiss.index_factory`` string."""

    kind: str
    factory: str
    nlist: int = 0
    train_rows: int = 0
    nprobe_candidates: list[int] = field(default_factory=list)
    target_recall: float = TARGET_RECALL
    exact: bool = True
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ivf_nlist(rows: int) -> int:
    """About 4 * sqrt(rows) cells, a power of two in [64, 65536] (autofaiss' rule of thumb),
    and never more than rows / 39 so k-means has >= 39 points per centroid."""
    target = 4 * math.sqrt(max(rows, 1))
    nlist = 2 ** int(round(math.log2(max(target, 1))))
    nlist = min(nlist, max(1, rows // 39))
    return int(max(1, min(65536, nlist)))


def choose_index(
    rows: int,
    dim: int = 512,
    kind: str = "auto",
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    flat_max_rows: int = FLAT_MAX_ROWS,
    target_recall: float = TUNING_RECALL,
) -> IndexSpec:
    """The index spec for ``rows`` vectors of ``dim`` float32 under ``memory_budget_bytes``."""
    if kind not in KINDS:
        raise MrisError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if rows < 1:
        raise MrisError("cannot build an index over zero rows")
    raw_bytes = rows * dim * 4
    if kind == "auto":
        if rows < flat_max_rows:
            kind, reason = "flat", f"{rows} rows < {flat_max_rows}: exact search is fast enough"
        elif raw_bytes <= memory_budget_bytes:
            kind, reason = (
                "ivf",
                f"{rows} rows >= {flat_max_rows}: IVF-Flat, nprobe tuned to recall@20 >= "
                f"{target_recall}",
            )
        else:
            kind = "ivfpq"
            reason = (
                f"raw vectors ({raw_bytes / 2**30:.1f} GiB) exceed the memory budget: IVF-PQ "
                "(lossy)"
            )
    else:
        reason = f"asked for {kind}"
    if kind == "flat":
        return IndexSpec(kind="flat", factory="Flat", reason=reason, target_recall=1.0)
    nlist = ivf_nlist(rows)
    if nlist < 2:
        return IndexSpec(
            kind="flat",
            factory="Flat",
            reason=f"{rows} rows too few for IVF: flat",
            target_recall=1.0,
        )
    train_rows = min(rows, 40 * nlist)  # >= 39 points per centroid, as FAISS asks
    candidates = [
        p for p in (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512) if p <= nlist
    ]
    if nlist not in candidates:
        candidates.append(nlist)
    if kind == "ivf":
        factory = f"IVF{nlist},Flat"
        exact = True
    else:
        m = 64 if dim % 64 == 0 else next(d for d in (32, 16, 8, 4, 2, 1) if dim % d == 0)
        factory = f"IVF{nlist},PQ{m}"
        exact = False
    return IndexSpec(
        kind=kind,
        factory=factory,
        nlist=nlist,
        train_rows=train_rows,
        nprobe_candidates=candidates,
        target_recall=target_recall,
        exact=exact,
        reason=reason,
    )
