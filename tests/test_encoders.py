"""mris.encoders: the onnxruntime wrapper on a tiny real ONNX encoder."""

from __future__ import annotations

import numpy as np
import pytest
from bundle_factory import make_encoder_onnx

from mris.encoders import OnnxEncoder, l2_normalise, select_providers
from mris.errors import BundleInvalid, MrisError


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory):
    return make_encoder_onnx(tmp_path_factory.mktemp("enc") / "enc.onnx", (32, 32), seed=3)


def test_embed_shapes_norm_batching(encoder_path):
    encoder = OnnxEncoder(encoder_path, device="cpu", intra_op_threads=1, batch_size=4)
    assert encoder.input_px == (32, 32) and encoder.embedding_dim == 512 and encoder.device == "cpu"
    images = np.random.default_rng(0).uniform(0, 1, (10, 1, 32, 32)).astype(np.float32)
    out = encoder.embed(images)
    assert out.shape == (10, 512) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.runs == 3 and encoder.images_embedded == 10
    # batching does not change the answer; [N, H, W] is accepted
    one_by_one = np.concatenate([encoder.embed(images[i : i + 1]) for i in range(10)])
    np.testing.assert_allclose(out, one_by_one, atol=1e-6)
    np.testing.assert_allclose(encoder.embed(images[:, 0]), out, atol=1e-6)
    assert encoder.embed(np.zeros((0, 1, 32, 32), np.float32)).shape == (0, 512)


def test_bad_inputs(encoder_path, tmp_path):
    encoder = OnnxEncoder(encoder_path, device="cpu", intra_op_threads=1)
    with pytest.raises(MrisError, match="32x32"):
        encoder.embed(np.zeros((1, 1, 16, 16), np.float32))
    with pytest.raises(MrisError, match=r"\[N, 1, H, W\]"):
        encoder.embed(np.zeros((1, 2, 32, 32), np.float32))
    with pytest.raises(BundleInvalid):
        OnnxEncoder(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(BundleInvalid, match="cannot be loaded"):
        OnnxEncoder(tmp_path / "junk.onnx")


def test_providers():
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert select_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(MrisError, match="onnxruntime-gpu"):
            select_providers("cuda")
    with pytest.raises(MrisError):
        select_providers("tpu")


def test_l2_normalise_keeps_zero_rows():
    out = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]])
