"""``.npy`` reading that is safe from many threads at once, on CPython 3.11.

CPython 3.11 keeps the AST constructor's recursion depth in one per-interpreter counter
(python/cpython gh-106905, fixed in 3.13), so two threads that build an AST at the same time
can fail with ``SystemError: AST constructor recursion depth mismatch`` when a garbage
collection between them runs Python code. numpy builds ASTs in two places our threads reach:
every ``.npy`` header is parsed with ``ast.literal_eval`` (``np.load``, the
``read_array_header`` functions), and the first ``np.unique`` of a process imports
``numpy.ma``, whose import calls ``inspect.signature`` on builtins (which parses). The service's
reload loads a bundle's arrays while requests run, and the index builder and the training cache
load maps from worker threads: both met the error.

So: ``load_npy`` and ``read_npy_header`` hold ``AST_LOCK`` while numpy parses, and importing
this module imports ``numpy.ma`` (``mris.pipeline`` imports it, so every process that serves
or evaluates has done that import in its main thread before any worker thread starts).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.ma  # noqa: F401 - imported here, in the importing thread, not by a worker's np.unique

AST_LOCK = threading.Lock()
"""Held while numpy parses an ``.npy`` header (an AST); a header is a few hundred bytes."""


def load_npy(path: str | Path, **kwargs: Any) -> Any:
    """``np.load(path, **kwargs)`` with ``AST_LOCK`` held (memory-mapped loads return at once;
    a full load of a small map takes microseconds)."""
    with AST_LOCK:
        return np.load(path, **kwargs)


def read_npy_header(handle: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the ``.npy`` file open at its start in ``handle``
    (left at the start of the data), with ``AST_LOCK`` held; ``ValueError`` when it is not one."""
    version = np.lib.format.read_magic(handle)
    with AST_LOCK:
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(handle)
        return np.lib.format.read_array_header_2_0(handle)
