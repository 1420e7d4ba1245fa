"""Micro-batching: the knee ROIs of concurrent requests share one encoder batch and one FAISS
search.

One worker task takes the first waiting item, waits at most ``max_wait_s`` for more (up to
``max_batch``), and runs ``process(items)`` in a thread, off the event loop. While a batch
computes, new items queue, so under load batches fill by themselves. The queue is bounded: a
full queue raises ``Overloaded`` at once (the route answers 503 with Retry-After) rather than
letting latency grow without limit.

``search_by_state`` is the service's ``process``: the batch unit
(``mris.pipeline.search_batch``, through the served state's ``Pipeline.search``) over the knee
ROIs of one batch, grouped by the served state each request holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from mris.pipeline import Hits
    from mris.service.state import ServingState

T = TypeVar("T")
R = TypeVar("R")


class Overloaded(Exception):
    """The queue is full."""


def search_by_state(
    items: Sequence[tuple[ServingState, np.ndarray, int]],
) -> list[dict[str, Hits]]:
    """Process one micro-batch: items are (served state, ROI image, k), results their ``Hits``
    per region in order. One ``search_batch`` (one encoder batch and one FAISS search per
    region) per served state, with the largest k asked (two states only meet during a reload;
    each request keeps its first k in ``synthesize_maps``)."""
    groups: dict[int, list[int]] = defaultdict(list)
    for position, (state, _, _) in enumerate(items):
        groups[id(state)].append(position)
    results: list = [None] * len(items)
    for positions in groups.values():
        state = items[positions[0]][0]
        k_max = max(items[p][2] for p in positions)
        hits = state.pipeline.search([items[p][1] for p in positions], k_max)
        for position, hit in zip(positions, hits):
            results[position] = hit
    return results


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R]],
        executor: Executor,
        max_batch: int = 16,
        max_wait_s: float = 0.003,
        max_queue: int = 64,
        on_batch: Callable[[int], Any] | None = None,
        on_depth: Callable[[int], Any] | None = None,
    ) -> None:
        self._process = process
        self._executor = executor
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_depth = on_depth
        self._queue: asyncio.Queue[_Pending[T]] | None = None
        self._worker: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._worker = asyncio.create_task(self._run(), name="mris-micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(Overloaded("the service is shutting down"))

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Queue all items (all or none) and wait for their results in order."""
        assert self._queue is not None, "MicroBatcher.start() was not awaited"
        if self._queue.qsize() + len(items) > self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} knee ROIs are already waiting")
        loop = asyncio.get_running_loop()
        pendings = [_Pending(item, loop.create_future()) for item in items]
        for pending in pendings:
            self._queue.put_nowait(pending)
        self._report_depth()
        try:
            return list(await asyncio.gather(*(p.future for p in pendings)))
        except asyncio.CancelledError:
            for pending in pendings:
                pending.future.cancel()
            raise

    def _report_depth(self) -> None:
        if self._on_depth is not None and self._queue is not None:
            self._on_depth(self._queue.qsize())

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                # Take what is already waiting, then wait for stragglers until the deadline.
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self._report_depth()
            await self._run_batch(batch, loop)
            # Nothing of a finished batch stays bound while this loop waits for the next one:
            # its items hold the served state, which must be freed after a reload.
            del batch, first

    async def _run_batch(self, batch: list[_Pending[T]], loop: asyncio.AbstractEventLoop) -> None:
        live = [p for p in batch if not p.future.done()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live))
        try:
            results = await loop.run_in_executor(
                self._executor, self._process, [p.item for p in live]
            )
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            for pending in live:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        for pending, result in zip(live, results):
            if not pending.future.done():
                pending.future.set_result(result)
