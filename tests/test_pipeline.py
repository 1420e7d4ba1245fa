"""The pipeline's plain stages: ``search_batch`` (ROIs in, hits out) with any encoder and index
that have the Protocols' methods, and ``synthesize_maps`` (hits in, maps out), which gives what
``Pipeline.assemble`` gave before it was split out, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mris.pipeline import Hits, KneeMaps, search_batch, synthesize_maps
from mris.roi import KneeRoi
from mris.synthesis import NAN_RULES, similarity_weights, synthesize

EMBEDDING_DIM = 4
ROWS = 12


class FakeEncoder:
    """Embeds an image as its unit-norm [mean, std, corner, offset]; counts its runs."""

    def __init__(self, offset: float) -> None:
        self.offset = offset
        self.batches: list[tuple[int, ...]] = []

    def embed(self, images: np.ndarray) -> np.ndarray:
        self.batches.append(images.shape)
        flat = images.reshape(images.shape[0], -1).astype(np.float64)
        columns = [flat.mean(1), flat.std(1), flat[:, 0], np.full(len(flat), self.offset)]
        vectors = np.stack(columns, 1)
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


class FakeIndex:
    """Exact inner-product search over a fixed database per region; pads with FAISS's empty slots
    (similarity -3.4e38, row -1) when k exceeds the rows; counts its searches."""

    def __init__(self, regions: tuple[str, ...], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.database = {}
        for region in regions:
            vectors = rng.normal(size=(ROWS, EMBEDDING_DIM))
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            self.database[region] = vectors.astype(np.float32)
        self.searches: list[tuple[str, tuple[int, ...], int]] = []

    def search(self, region: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.searches.append((region, queries.shape, k))
        scores = queries @ self.database[region].T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        similarities = np.take_along_axis(scores, order, 1).astype(np.float32)
        rows = order.astype(np.int64)
        if k > ROWS:
            pad = k - ROWS
            similarities = np.pad(similarities, ((0, 0), (0, pad)), constant_values=-3.4028235e38)
            rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        return similarities, rows


class FakeMaps:
    """Database maps in memory, float16 like the bundle's store, NaN outside cartilage."""

    def __init__(self, combined: bool = False, shape=(9, 7), seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.maps = {}
        for name in ("fc", "tc"):
            maps = rng.uniform(0.5, 3.5, (ROWS, *shape))
            maps[rng.uniform(size=maps.shape) < 0.3] = np.nan
            self.maps[name] = maps.astype(np.float16)
        self.combined = combined

    def cartilages(self, region: str) -> list[str]:
        return ["fc", "tc"] if self.combined else [region]

    def neighbour_maps(self, cartilage: str, row_ids: np.ndarray) -> np.ndarray:
        return self.maps[cartilage][row_ids]


def _rois(n: int, size: int = 8) -> list[KneeRoi]:
    rng = np.random.default_rng(5)
    return [
        KneeRoi(
            image=rng.uniform(0, 1, (size, size)).astype(np.float32),
            centre_xy=(10.0, 10.0),
            size_px=20.0,
            spacing_mm=0.2,
            side=("RIGHT", "LEFT")[i % 2],
            source="caller",
        )
        for i in range(n)
    ]


def test_search_batch_runs_one_encoder_batch_and_one_search_per_region():
    regions = ("fc", "tc")
    encoders = {region: FakeEncoder(offset) for region, offset in zip(regions, (0.1, 0.7))}
    index = FakeIndex(regions)
    rois = _rois(5)
    hits = search_batch(rois, 3, encoders=encoders, index=index)

    assert [e.batches for e in encoders.values()] == [[(5, 1, 8, 8)], [(5, 1, 8, 8)]]
    assert index.searches == [("fc", (5, EMBEDDING_DIM), 3), ("tc", (5, EMBEDDING_DIM), 3)]
    assert len(hits) == 5 and all(list(h) == ["fc", "tc"] for h in hits)
    for roi, roi_hits in zip(rois, hits):
        for region in regions:
            one = encoders[region].embed(roi.image[None, None])
            similarities, rows = index.search(region, one, 3)
            assert roi_hits[region].rows.tolist() == rows[0].tolist()
            np.testing.assert_allclose(roi_hits[region].similarities, similarities[0], rtol=1e-6)
    # ROI images (what the service's micro-batcher holds) give the same hits as the ROIs
    by_image = search_batch([roi.image for roi in rois], 3, encoders=encoders, index=index)
    for a, b in zip(hits, by_image):
        for region in regions:
            assert np.array_equal(a[region].rows, b[region].rows)
            assert np.array_equal(a[region].similarities, b[region].similarities)


def test_search_batch_needs_rois():
    with pytest.raises(ValueError, match="no ROIs"):
        search_batch([], 3, encoders={"fc": FakeEncoder(0.1)}, index=FakeIndex(("fc",)))


def test_hits_first_keeps_the_best_k_without_empty_slots():
    hits = Hits(np.array([0.9, 0.8, 0.7, -3.4e38], np.float32), np.array([4, 2, 7, -1], np.int64))
    assert hits.first(2).rows.tolist() == [4, 2]
    best = hits.first(10)
    assert best.rows.tolist() == [4, 2, 7] and best.rows.dtype == np.int64
    assert best.similarities.dtype == np.float32 and best.similarities.size == 3


def _old_assemble(roi_hits: dict[str, Hits], maps: FakeMaps, k: int, nan_rule: str):
    """``Pipeline.assemble``'s loop before ``synthesize_maps`` was split out of it (commit
    35260f9), less its decoration: rows, similarities, weights, maps and standard deviations."""
    rows_out, similarities_out, weights_out, maps_out, stds_out = {}, {}, {}, {}, {}
    for region, hit in roi_hits.items():
        rows = np.asarray(hit.rows[:k], np.int64)
        similarities = np.asarray(hit.similarities[:k], np.float32)
        keep = rows >= 0
        rows, similarities = rows[keep], similarities[keep]
        rows_out[region], similarities_out[region] = rows, similarities
        weights_out[region] = similarity_weights(similarities[None])[0]
        for name in maps.cartilages(region):
            neighbour_maps = maps.neighbour_maps(name, rows[None])
            out = synthesize(neighbour_maps, similarities[None], nan_rule=nan_rule)
            maps_out[name] = out.thickness_mm[0]
            stds_out[name] = out.std_mm[0]
    return rows_out, similarities_out, weights_out, maps_out, stds_out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("nan_rule", NAN_RULES)
@pytest.mark.parametrize("variant", ["separate", "combined"])
@pytest.mark.parametrize("k", [5, ROWS + 3])  # ROWS + 3: the index pads with empty slots
def test_synthesize_maps_equals_the_old_assemble_bit_for_bit(nan_rule, variant, k):
    regions = ("fc", "tc") if variant == "separate" else ("combined",)
    encoders = {region: FakeEncoder(0.1 + i) for i, region in enumerate(regions)}
    hits = search_batch(_rois(3), k, encoders=encoders, index=FakeIndex(regions))
    maps = FakeMaps(combined=variant == "combined")
    for roi_hits in hits:
        knee = synthesize_maps(roi_hits, maps, k, nan_rule)
        assert isinstance(knee, KneeMaps) and knee.nan_rule == nan_rule
        rows, similarities, weights, maps_mm, std_mm = _old_assemble(roi_hits, maps, k, nan_rule)
        assert list(knee.neighbours) == list(rows) and list(knee.maps_mm) == list(maps_mm)
        for region in rows:
            assert _same(knee.neighbours[region].rows, rows[region])
            assert _same(knee.neighbours[region].similarities, similarities[region])
            assert _same(knee.weights[region], weights[region])
            assert knee.neighbours[region].rows.size == min(k, ROWS)
        for name in maps_mm:
            assert _same(knee.maps_mm[name], maps_mm[name])
            assert _same(knee.std_mm[name], std_mm[name])
        bare = synthesize_maps(roi_hits, maps, k, nan_rule, with_maps=False)
        assert bare.maps_mm == {} and bare.std_mm == {} and bare.nan_rule is None
        for region in rows:
            assert _same(bare.weights[region], weights[region])


def test_assemble_is_synthesize_maps_with_the_request_around_it(tmp_path):
    from conftest import knee_phantom, make_dicom_bytes
    from serve_process import tiny_bundle
    from test_service import KEYPOINTS

    from mris.pipeline import Pipeline, RequestOptions
    from mris.roi import parse_keypoints

    model, index = tiny_bundle(tmp_path)
    pipeline = Pipeline.load(model, index, device="cpu", intra_op_threads=1)
    options = RequestOptions(keypoints=parse_keypoints(json.dumps(KEYPOINTS)), k=5)
    dicom = make_dicom_bytes(knee_phantom(), imager_spacing=(0.2, 0.2))
    prepared = pipeline.prepare(dicom, options)
    hits = pipeline.search(prepared.rois, 5)
    results = pipeline.assemble(prepared, hits, 5, nan_rule="all")
    assert [r.side for r in results] == ["RIGHT", "LEFT"]
    for result, knee_hits in zip(results, hits):
        knee = synthesize_maps(knee_hits, pipeline.index, 5, "all")
        assert result.spacing_source == "ImagerPixelSpacing" and result.nan_rule == "all"
        for name in ("fc", "tc"):
            assert _same(result.maps_mm[name], knee.maps_mm[name])
            assert _same(result.std_mm[name], knee.std_mm[name])
            neighbours = result.neighbours[name]
            assert [n.row for n in neighbours] == knee.neighbours[name].rows.tolist()
            assert [n.weight for n in neighbours] == knee.weights[name].tolist()
            pair_ids = [pipeline.index.rows[n.row].pair_id for n in neighbours]
            assert [n.pair_id for n in neighbours] == pair_ids
