"""Decoding where a runaway decoder cannot hurt the service: ``read_radiograph`` in worker
processes bounded in memory and time.

``mris.dicom`` checks every codestream header before a decoder runs, but the decoders are C, C++
and Rust libraries that trust their input, and a crafted file could still find a path we did not
think of. So the service never decodes in its own process. ``DecodeSandbox`` keeps a small pool
of worker processes (pebble's ``ProcessPool``, which replaces a worker that dies or overruns):

- each worker's address space is capped (``RLIMIT_AS``, ``memory_mb``): an allocation beyond it
  fails inside the decoder (an error, or the worker aborts), never in the server;
- each decode has a deadline (``timeout_s``): past it the worker is killed and replaced;
- the server's event loop only awaits a future, so ``/healthz`` and ``/readyz`` keep answering
  and SIGTERM is handled while any decode runs (a C decoder holding the GIL in a server thread
  blocked both before).

Outcomes, each a typed error the service maps to one status:

| what happened in the worker | error | HTTP |
|---|---|---|
| a typed error from ``read_radiograph`` | that error | 400 / 413 / 422 |
| ``MemoryError`` (the cap was hit in Python or reported by a decoder) | ``ImageTooLarge`` | 413 |
| the worker died (abort, segfault, killed) | ``DecoderCrashed`` | 400 |
| the deadline passed | ``DecodeTimeout`` | 503 |

Workers are forked from a forkserver that has already imported the decoders, so a replacement
starts in milliseconds, not the second a fresh interpreter takes. As with any multiprocessing
start method but fork, a script that starts a sandbox (or ``create_app``'s lifespan) must guard
its top level with ``if __name__ == "__main__":``; ``mris serve`` and uvicorn's own entry points do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import multiprocessing
import os
import resource
import threading
import weakref
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from mris.dicom import DecodeLimits, Radiograph, SourceIdentity, read_radiograph
from mris.errors import DecoderCrashed, DecodeTimeout, ImageTooLarge, MrisError, UnreadableDicom

DEFAULT_MEMORY_MB = 1536  # about 180 MB of imports, then 8x the 160 MB of a 40-Mpixel float image
DEFAULT_TIMEOUT_S = 15.0  # a full-size JPEG 2000 lossless radiograph decodes in about 1 s here


# Imported once by the forkserver, so a new worker is a fork with the decoders loaded.
_PRELOAD = ("mris.sandbox", "pydicom", "pydicom.pixels", "pylibjpeg", "openjpeg", "libjpeg", "rle")


def _keep_freed_memory() -> None:
    """Let glibc serve a worker's large buffers from its heap and keep them when freed, so the
    next decode reuses warm pages instead of faulting in fresh ones (a decode of a 10 MB file
    allocates tens of MB; first-touch page faults were half of the sandbox's cost). The address
    space cap still bounds what is kept."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 512 << 20)  # glibc caps it at 32 MiB on 64-bit
    libc.mallopt(m_trim_threshold, 1 << 30)


def _limit_memory(memory_mb: int) -> None:
    """Worker initializer: cap the address space; the decoders' allocations fail beyond it."""
    os.environ["RUST_BACKTRACE"] = "0"  # a panicking RLE decoder prints one line, not a stack
    _keep_freed_memory()
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _shm_has_room(nbytes: int) -> bool:
    """Whether /dev/shm can hold ``nbytes`` more (with a 64 MiB margin). A tmpfs that fills while
    a block is written kills the writer with SIGBUS; Docker gives containers 64 MiB unless told
    otherwise (docker-compose.yml sets ``shm_size``), so a full one falls back to the pipe."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= nbytes + (64 << 20)


@dataclass(frozen=True)
class _SharedPixels:
    """A decoded radiograph whose pixels wait in a shared-memory block: pickling 28 MB of float32
    through pebble's pipe cost about 110 ms here, a copy out of shared memory a few ms. The
    source's identity travels with it (pickled, never logged; its ``repr`` shows no value)."""

    block: str
    shape: tuple[int, int]
    spacing_mm: float
    spacing_source: str
    metadata: dict
    source: SourceIdentity | None = None

    def take(self) -> Radiograph:
        """Copy the pixels out and free the block."""
        block = shared_memory.SharedMemory(name=self.block)
        try:
            pixels = np.ndarray(self.shape, np.float32, buffer=block.buf).copy()
        finally:
            block.close()
            block.unlink()
        return Radiograph(pixels, self.spacing_mm, self.spacing_source, self.metadata, self.source)


_SHARED_INPUT_BYTES = 1 << 20  # larger uploads travel to the worker in shared memory too


@dataclass(frozen=True)
class _SharedBytes:
    block: str
    size: int


def _share_bytes(data: bytes) -> tuple[_SharedBytes, shared_memory.SharedMemory]:
    block = shared_memory.SharedMemory(create=True, size=len(data))
    block.buf[: len(data)] = data
    return _SharedBytes(block.name, len(data)), block


def _read_in_worker(
    source: bytes | str | _SharedBytes,
    spacing_mm: float | None,
    limits: DecodeLimits,
    memory_mb: int,
) -> _SharedPixels | Radiograph:
    if isinstance(source, _SharedBytes):
        block = shared_memory.SharedMemory(name=source.block)
        try:
            source = bytes(block.buf[: source.size])
        finally:
            block.close()
    try:
        radiograph = read_radiograph(source, spacing_mm=spacing_mm, limits=limits)
        pixels = radiograph.pixels
        if not _shm_has_room(pixels.nbytes):
            return radiograph  # pickled through the pipe: slower, never a SIGBUS
        block = shared_memory.SharedMemory(create=True, size=max(pixels.nbytes, 1))
        try:
            np.ndarray(pixels.shape, np.float32, buffer=block.buf)[...] = pixels
        finally:
            block.close()
    except MemoryError:
        raise ImageTooLarge(
            f"decoding this file needs more than the decoder's memory budget of {memory_mb} MB"
        ) from None
    return _SharedPixels(
        block.name,
        radiograph.shape,
        radiograph.spacing_mm,
        radiograph.spacing_source,
        radiograph.metadata,
        radiograph.source,
    )


class DecodeSandbox:
    """``read_radiograph`` in ``workers`` processes, each capped at ``memory_mb`` of address
    space, each decode at ``timeout_s`` seconds. Start with ``start()``; ``close()`` kills the
    workers at once (what is in flight fails with ``DecoderCrashed``).

    A worker that dies before the pool registered its task leaves pebble's pool broken (every
    task in it fails with ``BrokenProcessPool``): the sandbox then starts a new pool and submits
    each affected decode once more, so a hostile file cannot fail its neighbours' requests; a
    decode that breaks the pool twice is ``DecoderCrashed``.
    """

    def __init__(
        self,
        workers: int = 2,
        memory_mb: int = DEFAULT_MEMORY_MB,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if workers < 1 or memory_mb < 256 or timeout_s <= 0:
            raise ValueError("DecodeSandbox needs workers >= 1, memory_mb >= 256 and timeout_s > 0")
        self.workers = workers
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self._pool = None
        self._lock = threading.Lock()
        self._pending: weakref.WeakSet[concurrent.futures.Future] = weakref.WeakSet()

    def _new_pool(self):
        from pebble import ProcessPool

        context = multiprocessing.get_context("forkserver")
        # The forkserver imports the decoders once; each worker is a fork of it.
        context.set_forkserver_preload(list(_PRELOAD))
        pool = ProcessPool(
            max_workers=self.workers,
            initializer=_limit_memory,
            initargs=(self.memory_mb,),
            context=context,
        )
        pool.schedule(os.getpid).result()  # start the workers now, not on the first file
        return pool

    def start(self) -> DecodeSandbox:
        from pebble.common import CONSTS

        # A worker stuck in C code cannot run pebble's SIGTERM handler; it is SIGKILLed after
        # this grace (pebble's default is 3 s). Decode workers hold nothing worth a clean exit.
        CONSTS.term_timeout = 0.5
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
        return self

    def _restart(self, broken) -> None:
        """Replace a broken pool (once, however many decodes noticed it)."""
        with self._lock:
            if self._pool is broken and broken is not None:
                self._pool = None
                broken.stop()
                broken.join(timeout=5)
                self._pool = self._new_pool()

    def close(self) -> None:
        """Kill the workers now; decodes in flight fail with ``DecoderCrashed``."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.stop()
        pool.join(timeout=5)
        for future in list(self._pending):
            if not future.done():
                try:
                    future.set_exception(DecoderCrashed("the service is shutting down"))
                except concurrent.futures.InvalidStateError:
                    pass

    def __enter__(self) -> DecodeSandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def submit(
        self,
        source: bytes | str | Path,
        spacing_mm: float | None = None,
        limits: DecodeLimits | None = None,
    ) -> concurrent.futures.Future:
        pool = self._pool
        if pool is None:
            raise DecoderCrashed(
                "the decoder pool is not running (the service is starting or stopping)"
            )
        if isinstance(source, Path):
            source = str(source)
        shared = None
        if (
            isinstance(source, (bytes, bytearray, memoryview))
            and len(source) > _SHARED_INPUT_BYTES
            and _shm_has_room(len(source))
        ):
            source, shared = _share_bytes(source)
        future = pool.schedule(
            _read_in_worker,
            args=(source, spacing_mm, limits or DecodeLimits(), self.memory_mb),
            timeout=self.timeout_s,
        )
        if shared is not None:
            future.add_done_callback(lambda _, block=shared: (block.close(), block.unlink()))
        future.pool = pool  # which pool to replace if this one breaks
        self._pending.add(future)
        return future

    def outcome(self, future: concurrent.futures.Future) -> Radiograph:
        """The result of a finished ``submit`` future, every failure as a typed error."""
        from pebble import ProcessExpired

        try:
            result = future.result()
            return result.take() if isinstance(result, _SharedPixels) else result
        except MrisError:
            raise
        except (concurrent.futures.TimeoutError, TimeoutError):
            raise DecodeTimeout(
                f"decoding the pixel data took longer than {self.timeout_s:g} s; the file is "
                "corrupt, hostile or too complex to decode"
            ) from None
        except ProcessExpired as exc:
            raise DecoderCrashed(
                f"the decoder crashed on this file (worker exit code {exc.exitcode}); the file is "
                "corrupt or hostile"
            ) from None
        except concurrent.futures.CancelledError:
            raise
        except BrokenProcessPool:
            self._restart(getattr(future, "pool", None))
            raise
        except Exception as exc:  # noqa: BLE001 - a result that did not pickle, the pool shut down...
            raise UnreadableDicom(
                f"the DICOM could not be decoded: {type(exc).__name__} in the decoder pool"
            ) from None

    def read(
        self,
        source: bytes | str | Path,
        spacing_mm: float | None = None,
        limits: DecodeLimits | None = None,
    ) -> Radiograph:
        """Blocking read (CLI tools, the fuzzer)."""
        for attempt in (1, 2):
            future = self.submit(source, spacing_mm, limits)
            concurrent.futures.wait([future])
            try:
                return self.outcome(future)
            except BrokenProcessPool:
                if attempt == 2:
                    raise _crashed() from None
        raise AssertionError("unreachable")

    async def read_async(
        self, source: bytes, spacing_mm: float | None = None, limits: DecodeLimits | None = None
    ) -> Radiograph:
        """Await a read without blocking the event loop. Cancelling the awaiting task cancels
        the decode (pebble kills a worker whose task is cancelled while it runs)."""
        for attempt in (1, 2):
            future = self.submit(source, spacing_mm, limits)
            try:
                await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                if not future.cancel():  # already decoded: free the pixels nobody will take
                    _discard(future)
                raise
            except Exception:  # noqa: BLE001, S110 - outcome() turns it into a typed error
                pass
            try:
                # Off the event loop: copying the pixels out (tens of MB) or replacing a broken
                # pool blocks for milliseconds to seconds.
                return await asyncio.get_running_loop().run_in_executor(None, self.outcome, future)
            except BrokenProcessPool:
                if attempt == 2:
                    raise _crashed() from None
        raise AssertionError("unreachable")


def _discard(future: concurrent.futures.Future) -> None:
    """Free the shared-memory block of a finished decode whose result is not wanted."""
    if future.done() and not future.cancelled() and future.exception() is None:
        result = future.result()
        if isinstance(result, _SharedPixels):
            try:
                block = shared_memory.SharedMemory(name=result.block)
                block.close()
                block.unlink()
            except FileNotFoundError:
                pass


def _crashed() -> DecoderCrashed:
    return DecoderCrashed("the decoder crashed on this file twice; the file is corrupt or hostile")


def worker_pids(sandbox: DecodeSandbox) -> list[int]:
    """The live worker processes' ids (for memory reports and tests)."""
    pool = sandbox._pool
    if pool is None:
        return []
    workers = getattr(getattr(pool, "_pool_manager", None), "worker_manager", None)
    processes = getattr(workers, "workers", {}) if workers is not None else {}
    return [pid for pid in processes if os.path.exists(f"/proc/{pid}")]
