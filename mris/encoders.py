"""ONNX encoder runtime (onnxruntime), shared by index building and the service.

An encoder maps a batch of 1-channel images float32 ``[N, 1, H, W]`` to L2-normalised
embeddings float32 ``[N, 512]`` (ONNX input ``image``, output ``embedding``;
docs/ARCHITECTURE.md). This module owns the arrow "encoder inputs -> embeddings"; it imports no
torch.

Threads are set explicitly: on a shared CPU, onnxruntime's default (one intra-op thread per core)
fights FAISS's OpenMP and numpy's BLAS pools (PERF_FACTS.md). ``device="auto"`` uses the CUDA
execution provider when onnxruntime-gpu provides it, else the CPU.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from mris.errors import BundleInvalid, MrisError

DEVICES = ("auto", "cpu", "cuda")


def default_threads() -> int:
    """CPU threads an encoder uses unless told: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def select_providers(device: str = "auto") -> list[str]:
    """onnxruntime execution providers for ``device`` (auto | cpu | cuda).

    ``cuda`` without onnxruntime-gpu's CUDA provider is an error, not a silent CPU fallback.
    """
    import onnxruntime as ort

    if device not in DEVICES:
        raise MrisError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if device == "cuda" and not has_cuda:
        raise MrisError(
            "device 'cuda' asked but onnxruntime has no CUDAExecutionProvider "
            "(install the gpu extra: onnxruntime-gpu)"
        )
    if device in ("auto", "cuda") and has_cuda:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def session_options(threads: int | None = None, inter_op_threads: int = 1):
    """ONNX Runtime session options of every serving session (encoders, localiser): ``threads``
    intra-op threads (default: all usable cores), and no spin-waiting: an idle intra-op pool
    otherwise spins about 60 ms after each run, and with four sessions per request that burnt
    half the service's CPU and slowed the next request (measured: server CPU per request
    104-119 ms -> 50-62 ms on the demo bundle, benchmarks/bench_service.py)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class OnnxEncoder:
    """One ONNX encoder (radiograph or thickness) in an onnxruntime session.

    - ``path``: the ``.onnx`` file; ``sha256`` (optional) is recorded for cards, not checked here
      (``mris.model_bundle.load_model_bundle`` checks files against the model card).
    - ``intra_op_threads``: CPU threads per inference (default: all usable cores).
    - ``batch_size``: ``embed`` splits larger inputs into runs of at most this many images.

    ``session.run`` is thread-safe, so one encoder may serve several threads. ``images_embedded``
    and ``runs`` count the work done (used by tests and the build summary).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "auto",
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        batch_size: int = 16,
        sha256: str | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise BundleInvalid(f"encoder {self.path} does not exist")
        if batch_size < 1:
            raise MrisError(f"batch_size must be >= 1, got {batch_size}")
        self.sha256 = sha256
        self.batch_size = batch_size
        self.providers = select_providers(device)
        options = session_options(intra_op_threads, inter_op_threads)
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=self.providers
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BundleInvalid(
                f"encoder {self.path} cannot be loaded by onnxruntime: {exc}"
            ) from exc
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise BundleInvalid(
                f"encoder {self.path}: expected one input and an 'embedding' output"
            )
        self.input_name = inputs[0].name
        names = [o.name for o in outputs]
        self.output_name = "embedding" if "embedding" in names else names[0]
        shape = inputs[0].shape  # [N, 1, H, W]; N (and maybe H, W) symbolic
        if len(shape) != 4:
            raise BundleInvalid(f"encoder {self.path}: input must be [N, 1, H, W], got {shape}")
        self.input_px: tuple[int, int] | None = (
            (int(shape[2]), int(shape[3]))
            if isinstance(shape[2], int) and isinstance(shape[3], int)
            else None
        )
        out_shape = outputs[names.index(self.output_name)].shape
        self.embedding_dim: int | None = (
            int(out_shape[-1]) if isinstance(out_shape[-1], int) else None
        )
        self._lock = threading.Lock()
        self.images_embedded = 0
        self.runs = 0

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    def _check(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim == 3:  # [N, H, W] -> [N, 1, H, W]
            images = images[:, None]
        if images.ndim != 4 or images.shape[1] != 1:
            raise MrisError(f"encoder input must be [N, 1, H, W], got shape {images.shape}")
        if self.input_px is not None and tuple(images.shape[2:]) != self.input_px:
            raise MrisError(
                f"encoder {self.path.name} expects {self.input_px[0]}x{self.input_px[1]} inputs, "
                f"got {images.shape[2]}x{images.shape[3]}"
            )
        return np.ascontiguousarray(images, dtype=np.float32)

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embed float32 ``[N, 1, H, W]`` (or ``[N, H, W]``) -> float32 ``[N, D]``, unit L2 norm.

        Runs in batches of ``batch_size``. The ONNX graph already normalises; normalising again
        in float32 costs nothing and guarantees inner product == cosine for FAISS.
        """
        images = self._check(images)
        n = images.shape[0]
        if n == 0:
            return np.zeros((0, self.embedding_dim or 0), np.float32)
        parts = []
        for start in range(0, n, self.batch_size):
            batch = images[start : start + self.batch_size]
            (out,) = self.session.run([self.output_name], {self.input_name: batch})
            parts.append(np.asarray(out, dtype=np.float32).reshape(batch.shape[0], -1))
        with self._lock:
            self.images_embedded += n
            self.runs += len(parts)
        return l2_normalise(np.concatenate(parts) if len(parts) > 1 else parts[0])


def l2_normalise(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (float32); zero rows stay zero."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, eps)).astype(np.float32, copy=False)
