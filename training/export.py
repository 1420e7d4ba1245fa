"""ONNX export with parity checks, and the model bundle (``mris.model_bundle``).

Encoders: input ``image`` float32 ``[N, 1, H, W]`` (dynamic N, fixed H, W), output ``embedding``
float32 ``[N, 512]``, L2-normalised. The localiser's two stages are exported the same way
(``mris.localiser`` documents their outputs). Export uses torch's ``torch.export``-based ONNX
exporter (opset 18), one self-contained file per network.

Parity (``check_encoder_parity``): on up to 64 cached inputs, max |torch - onnxruntime| over the
embeddings must be <= 1e-4; on the validation set, each query's top-20 neighbour order computed
from onnxruntime embeddings must equal the order from torch embeddings (a swap counts only when
the two similarities differ by more than 1e-6, i.e. it is not an exact tie). A failure raises
``ExportParityError`` and no bundle is written.
"""

from __future__ import annotations

import contextlib
import io
import platform
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mris.constants import PREPROCESSING_VERSION
from mris.errors import MrisError
from mris.fsutil import atomic_write
from mris.model_bundle import ModelCard, write_model_card

PARITY_TOLERANCE = 1e-4
PARITY_IMAGES = 64
TOP_K = 20
OPSET = 18


class ExportParityError(MrisError):
    """The exported ONNX graph does not reproduce the torch model within tolerance."""


def export_onnx(
    model: torch.nn.Module, path: Path, input_px: tuple[int, int], output_names: list[str]
) -> Path:
    """Export ``model`` (eval mode, CPU, float32) with a dynamic batch; written atomically."""
    model = model.eval().float().cpu()
    example = torch.zeros(2, 1, *input_px)
    batch = torch.export.Dim("batch", min=1, max=4096)

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                input_names=["image"],
                output_names=output_names,
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,
            )
            program.save(str(tmp))

    return atomic_write(path, write)


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def run_onnx(session, images: np.ndarray, batch: int = 32) -> np.ndarray:
    outs = [
        session.run(
            ["embedding"], {"image": np.ascontiguousarray(images[i : i + batch], np.float32)}
        )[0]
        for i in range(0, len(images), batch)
    ]
    return np.concatenate(outs)


@torch.no_grad()
def run_torch(model: torch.nn.Module, images: np.ndarray, batch: int = 64) -> np.ndarray:
    model = model.eval().float().cpu()
    return np.concatenate(
        [
            model(torch.from_numpy(np.ascontiguousarray(images[i : i + batch], np.float32))).numpy()
            for i in range(0, len(images), batch)
        ]
    )


def topk_order_mismatches(
    sim_a: np.ndarray, sim_b: np.ndarray, k: int = TOP_K, tie: float = 1e-6
) -> int:
    """Queries whose top-k gallery order differs between two similarity matrices, ignoring
    swaps between exact ties (|similarity difference| <= ``tie``)."""
    k = min(k, sim_a.shape[1])
    order_a = np.argsort(-sim_a, axis=1, kind="stable")[:, :k]
    order_b = np.argsort(-sim_b, axis=1, kind="stable")[:, :k]
    bad = 0
    for q in np.nonzero((order_a != order_b).any(axis=1))[0]:
        # compare the similarity profiles of both orders under sim_a: a tie swap keeps them equal
        if np.abs(sim_a[q, order_a[q]] - sim_a[q, order_b[q]]).max() > tie:
            bad += 1
    return bad


@dataclass
class EncoderParity:
    max_abs_diff_radiograph: float
    max_abs_diff_thickness: float
    images: int
    val_queries: int
    top20_order_mismatches: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def check_encoder_parity(
    f: torch.nn.Module,
    g: torch.nn.Module,
    f_path: Path,
    g_path: Path,
    val_radiographs: np.ndarray,
    val_thickness: np.ndarray,
    parity_images: np.ndarray | None = None,
    parity_maps: np.ndarray | None = None,
    threads: int | None = None,
) -> EncoderParity:
    """Arrays are ``[N, 1, H, W]`` float32. Raises ``ExportParityError`` on failure."""
    f_session, g_session = onnx_session(f_path, threads), onnx_session(g_path, threads)
    images = (val_radiographs if parity_images is None else parity_images)[:PARITY_IMAGES]
    maps = (val_thickness if parity_maps is None else parity_maps)[:PARITY_IMAGES]
    diff_f = float(np.abs(run_torch(f, images) - run_onnx(f_session, images)).max())
    diff_g = float(np.abs(run_torch(g, maps) - run_onnx(g_session, maps)).max())
    sim_torch = run_torch(f, val_radiographs) @ run_torch(g, val_thickness).T
    sim_onnx = run_onnx(f_session, val_radiographs) @ run_onnx(g_session, val_thickness).T
    mismatches = topk_order_mismatches(sim_torch, sim_onnx)
    parity = EncoderParity(diff_f, diff_g, int(len(images)), int(len(val_radiographs)), mismatches)
    if max(diff_f, diff_g) > PARITY_TOLERANCE or mismatches:
        raise ExportParityError(
            f"ONNX export of {f_path.name}/{g_path.name} fails parity: max abs diff "
            f"{max(diff_f, diff_g):.2e} (limit {PARITY_TOLERANCE:.0e}), top-{TOP_K} order "
            "differs on "
            f"{mismatches} of {len(val_radiographs)} validation queries"
        )
    return parity


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def write_bundle_card(root: Path, card_fields: dict[str, Any]) -> Path:
    """Build the ``ModelCard`` and write it (sha256 of every file in ``root``)."""
    card = ModelCard(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        preprocessing_version=PREPROCESSING_VERSION,
        versions=library_versions(),
        **card_fields,
    )
    return write_model_card(root, card)
