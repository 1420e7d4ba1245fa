"""``mris.npyio``: numpy's .npy header parsing (an AST) serialised across threads, and numpy.ma
imported by the pipeline's importer (CPython 3.11's AST constructor is not thread-safe)."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mris.npyio import AST_LOCK, load_npy, read_npy_header


def test_loads_wait_for_the_ast_lock(tmp_path):
    path = tmp_path / "map.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(3, 4))
    results = []
    with AST_LOCK:
        thread = threading.Thread(target=lambda: results.append(load_npy(path)))
        thread.start()
        thread.join(timeout=0.3)
        assert thread.is_alive() and results == []  # blocked while another parse holds it
    thread.join(timeout=10)
    np.testing.assert_array_equal(results[0], np.arange(12, dtype=np.float32).reshape(3, 4))
    with open(path, "rb") as handle:
        assert read_npy_header(handle) == ((3, 4), False, np.dtype("float32"))
        assert handle.tell() == 128  # left at the data


def test_many_threads_load_their_own_arrays(tmp_path):
    paths = []
    for i in range(32):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.full((8, 8), i, dtype=np.float32))
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda p: load_npy(p, mmap_mode="r"), paths * 4))
    assert [float(array[0, 0]) for array in loaded] == [float(i) for i in range(32)] * 4


def test_importing_the_pipeline_imports_numpy_ma():
    """A worker thread's first np.unique must not be the import of numpy.ma (it parses)."""
    code = "import sys, mris.pipeline; print('numpy.ma' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
