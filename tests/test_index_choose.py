"""mris.index.choose and build_faiss_index: kinds by size, tuned nprobe, measured recall."""

from __future__ import annotations

import numpy as np
import pytest

from mris.errors import MrisError
from mris.index.build import build_faiss_index
from mris.index.choose import FLAT_MAX_ROWS, choose_index, ivf_nlist
from mris.index.verify import self_retrieval_failures


def test_auto_thresholds():
    assert choose_index(1000).kind == "flat"
    assert choose_index(FLAT_MAX_ROWS - 1).kind == "flat"
    spec = choose_index(1_000_000)
    assert spec.kind == "ivf" and spec.factory == "IVF4096,Flat" and spec.exact
    assert choose_index(1_000_000, memory_budget_bytes=1 << 30).kind == "ivfpq"
    assert choose_index(500, kind="flat").kind == "flat"
    with pytest.raises(MrisError):
        choose_index(10, kind="hnsw")
    with pytest.raises(MrisError):
        choose_index(0)
    assert ivf_nlist(20_000) == 512 and ivf_nlist(200_000) == 2048


def clustered(n, dim=64, centres=50, spread=0.25, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (centres, dim))
    x = means[rng.integers(0, centres, n)] + spread * rng.normal(0, 1, (n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_reaches_target_recall_and_self_retrieval():
    x = clustered(8000)
    spec = choose_index(len(x), x.shape[1], kind="ivf")
    built = build_faiss_index(x, spec, recall_queries=200)
    assert built.recall_at_20 >= 0.99 and built.nprobe in spec.nprobe_candidates
    assert built.recall_queries == 200
    assert len(self_retrieval_failures(built.index, x)) == 0
    flat = build_faiss_index(x, choose_index(len(x), x.shape[1], kind="flat"))
    assert flat.recall_at_20 == 1.0 and flat.index.ntotal == len(x)
