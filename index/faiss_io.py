"""FAISS files in and out, and on the GPU when one is present.

``read_index(path, mmap)`` reads an ``index-<region>.faiss`` (memory-mapped read-only when the
FAISS build allows it), ``write_index`` writes one, ``load_search_index`` is what a loaded
bundle does per region (count check, the card's ``nprobe``, the GPU copy), ``search_device``
decides cpu or cuda from the asked ``device`` and what FAISS sees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mris.encoders import default_threads
from mris.errors import BadParameter, BundleInvalid


def set_faiss_threads(threads: int | None) -> None:
    """FAISS's OpenMP threads (``default_threads()`` when ``None`` or 0)."""
    import faiss

    faiss.omp_set_num_threads(threads or default_threads())


def read_index(path: Path, mmap: bool = False) -> tuple[Any, bool]:
    """The FAISS index at ``path`` and whether it is memory-mapped (asked with ``mmap`` and
    supported by this FAISS build; otherwise it is read into RAM)."""
    import faiss

    if mmap:
        for name in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP"):
            flag = getattr(faiss, name, None)
            if flag is None:
                continue
            try:
                return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY), True
            except RuntimeError:
                continue
    return faiss.read_index(str(path)), False


def write_index(index: Any, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


def set_nprobe(index: Any, nprobe: int) -> None:
    """Set an IVF index's ``nprobe`` (no-op for 0: a flat index)."""
    if nprobe:
        import faiss

        faiss.extract_index_ivf(index).nprobe = nprobe


def gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    except Exception:  # pragma: no cover
        return False


def search_device(device: str) -> str:
    """``cuda`` for ``auto``/``cuda`` when FAISS sees a GPU, else ``cpu``; ``BadParameter`` for
    ``cuda`` without one."""
    chosen = "cuda" if device in ("auto", "cuda") and gpu_available() else "cpu"
    if device == "cuda" and chosen != "cuda":
        raise BadParameter("device 'cuda' asked but FAISS sees no GPU (install faiss-gpu)")
    return chosen


class GpuCloner:
    """Copies CPU indexes to GPU 0, sharing one ``StandardGpuResources`` (made on first use)."""

    def __init__(self, fp16: bool = False):
        self.fp16 = fp16
        self._resources = None

    def to_gpu(self, index: Any) -> Any:  # pragma: no cover - needs a GPU
        import faiss

        if self._resources is None:
            self._resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16 = self.fp16
        return faiss.index_cpu_to_gpu(self._resources, 0, index, options)


def load_search_index(
    path: Path, rows: int, nprobe: int = 0, *, mmap: bool = True, gpu: GpuCloner | None = None
) -> tuple[Any, bool]:
    """One region's index ready to search: read (memory-mapped on the CPU when ``mmap``), checked
    to hold ``rows`` vectors (``BundleInvalid``), ``nprobe`` set, copied to the GPU with ``gpu``.
    Returns the index and whether it is memory-mapped."""
    index, mmapped = read_index(path, mmap and gpu is None)
    if index.ntotal != rows:
        raise BundleInvalid(f"{path.name} holds {index.ntotal} vectors, card says {rows}")
    set_nprobe(index, nprobe)
    if gpu is not None:
        index = gpu.to_gpu(index)
    return index, mmapped


__all__ = [
    "GpuCloner",
    "gpu_available",
    "load_search_index",
    "read_index",
    "search_device",
    "set_faiss_threads",
    "set_nprobe",
    "write_index",
]
