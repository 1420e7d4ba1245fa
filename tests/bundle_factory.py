"""Tiny REAL model bundles and thickness-map cohorts for tests (no torch, no mocks).

``make_model_bundle(root)`` writes ONNX encoders built with ``onnx.helper`` for both variants
(input ``image`` [N, 1, H, W], output ``embedding`` [N, 512], L2-normalised) and a ``card.json``
through ``mris.model_bundle.write_model_card``, so it loads with ``load_model_bundle`` like a
trained bundle. Each encoder is Conv(3x3) -> Relu -> AveragePool(to 4x4) -> Flatten -> MatMul
-> LpNormalization; the weights come from a seed, so two encoders differ.

``make_map_cohort(root, n)`` writes ``n`` knee-visit pairs of small fc/tc ``.npy`` maps (mm, NaN
outside an elliptic cartilage region, smooth per-knee patterns) and a manifest CSV.
Other test modules (the service's) import these builders.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mris.constants import PREPROCESSING_VERSION, PreprocessConfig
from mris.manifest import ManifestRow, write_manifest
from mris.model_bundle import EncoderPair, ModelCard, VariantCard, write_model_card

EMBEDDING_DIM = 512
TINY_ENCODER_PX = 32
TINY_MAP_PX = (40, 36)


def make_encoder_onnx(
    path: str | Path, input_px: tuple[int, int], seed: int, channels: int = 8
) -> Path:
    """Write a small real ONNX encoder: [N, 1, rows, cols] float32 -> [N, 512] unit-norm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rows, cols = input_px
    if rows % 4 or cols % 4:
        raise ValueError("input sides must be multiples of 4")
    rng = np.random.default_rng(seed)
    conv_w = rng.normal(0, 1, (channels, 1, 3, 3)).astype(np.float32)
    conv_b = rng.normal(0, 0.1, (channels,)).astype(np.float32)
    proj = rng.normal(0, 1, (channels * 16, EMBEDDING_DIM)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node(
            "AveragePool",
            ["relu"],
            ["pooled"],
            kernel_shape=[rows // 4, cols // 4],
            strides=[rows // 4, cols // 4],
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "proj"], ["raw"]),
        helper.make_node("LpNormalization", ["raw"], ["embedding"], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_encoder",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, rows, cols])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", EMBEDDING_DIM])],
        initializer=[
            numpy_helper.from_array(conv_w, "conv_w"),
            numpy_helper.from_array(conv_b, "conv_b"),
            numpy_helper.from_array(proj, "proj"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="mris-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_model_bundle(root: str | Path, encoder_px: int = TINY_ENCODER_PX, seed: int = 0) -> Path:
    """A complete tiny model bundle (both variants, no localiser) at ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = PreprocessConfig(encoder_px=encoder_px)
    square = (encoder_px, encoder_px)
    stacked = (2 * encoder_px, encoder_px)
    variants: dict[str, VariantCard] = {}
    regions = {}
    for index, region in enumerate(("fc", "tc")):
        radiograph = f"separate-{region}-radiograph.onnx"
        thickness = f"separate-{region}-thickness.onnx"
        make_encoder_onnx(root / radiograph, square, seed * 100 + 2 * index)
        make_encoder_onnx(root / thickness, square, seed * 100 + 2 * index + 1)
        regions[region] = EncoderPair(
            radiograph=radiograph,
            thickness=thickness,
            radiograph_input_px=square,
            thickness_input_px=square,
        )
    variants["separate"] = VariantCard(regions=regions)
    make_encoder_onnx(root / "combined-radiograph.onnx", square, seed * 100 + 10)
    make_encoder_onnx(root / "combined-thickness.onnx", stacked, seed * 100 + 11)
    variants["combined"] = VariantCard(
        regions={
            "combined": EncoderPair(
                radiograph="combined-radiograph.onnx",
                thickness="combined-thickness.onnx",
                radiograph_input_px=square,
                thickness_input_px=stacked,
            )
        }
    )
    card = ModelCard(
        created=datetime.now(timezone.utc).isoformat(),
        preprocess=config.to_dict(),
        preprocessing_version=PREPROCESSING_VERSION,
        variants=variants,
        training={"note": "tiny test bundle from tests/bundle_factory.py"},
    )
    write_model_card(root, card)
    return root


def tiny_map(
    rng: np.random.Generator, shape: tuple[int, int] = TINY_MAP_PX, base_mm: float = 2.3
) -> np.ndarray:
    """One float32 thickness map (mm): a smooth random pattern inside an ellipse, NaN outside."""
    rows, cols = shape
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2 + rng.normal(0, 1), cols / 2 + rng.normal(0, 1)
    inside = ((y - cy) / (0.42 * rows)) ** 2 + ((x - cx) / (0.42 * cols)) ** 2 <= 1.0
    fy, fx, phase = rng.uniform(0.5, 2.5), rng.uniform(0.5, 2.5), rng.uniform(0, 2 * np.pi)
    pattern = np.sin(fy * y / rows * np.pi + phase) * np.cos(fx * x / cols * np.pi)
    thickness = base_mm + 1.2 * pattern + rng.normal(0, 0.05, shape)
    thickness = np.clip(thickness, 0.0, 5.5).astype(np.float32)
    return np.where(inside, thickness, np.nan).astype(np.float32)


def make_map_cohort(
    root: str | Path,
    n_pairs: int,
    seed: int = 0,
    split: str = "database",
    shape: tuple[int, int] = TINY_MAP_PX,
    first_index: int = 0,
    manifest_name: str = "manifest.csv",
) -> Path:
    """Write ``n_pairs`` fc/tc maps under ``root/maps`` and ``root/<manifest_name>``; return the
    manifest path. Pair ids are ``P{index:05d}``; two visits per knee, two knees per subject."""
    root = Path(root)
    (root / "maps").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 7919 * first_index)
    rows = []
    for index in range(first_index, first_index + n_pairs):
        subject, rest = divmod(index, 4)
        side = "LEFT" if rest < 2 else "RIGHT"
        visit = (0, 12)[rest % 2]
        pair_id = f"P{index:05d}"
        for cartilage in ("fc", "tc"):
            np.save(root / "maps" / f"{pair_id}_{cartilage}.npy", tiny_map(rng, shape))
        rows.append(
            ManifestRow(
                pair_id=pair_id,
                subject_id=f"S{subject:04d}",
                side=side,
                visit_month=visit,
                radiograph_path=f"xr/{pair_id}.dcm",
                fc_path=f"maps/{pair_id}_fc.npy",
                tc_path=f"maps/{pair_id}_tc.npy",
                split=split,
                klg=int(rng.integers(0, 5)),
            )
        )
    return write_manifest(root / manifest_name, rows)
