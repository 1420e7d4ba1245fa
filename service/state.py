"""What the service serves (a loaded pipeline) and its atomic replacement on reload.

Every request takes a reference to the current ``ServingState`` when it starts and uses it to
the end, so a reload swaps the reference for new requests while in-flight ones finish on the
bundle they began with. A failed load leaves the old state serving.

``StateHolder.reload`` is the one reload path: the lifespan's first load, SIGHUP and
``POST /admin/reload`` all call it, and it keeps the metrics in step (the served bundle's
``mris_bundle_info``; ``mris_reloads_total`` by outcome for every load but the first).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from mris.pipeline import Pipeline
from mris.service.config import Settings
from mris.service.metrics import Metrics

log = logging.getLogger("mris.service")


@dataclass
class ServingState:
    pipeline: Pipeline
    loaded_at: float = field(default_factory=time.time)

    @property
    def index_version(self) -> str:
        return self.pipeline.index_version


def load_state(settings: Settings) -> ServingState:
    pipeline = Pipeline.load(
        model_dir=settings.model_dir,
        index_root=settings.index_root,
        variant=settings.variant,
        device=settings.device,
        intra_op_threads=settings.intra_op_threads,
        max_pixels=settings.max_pixels,
    )
    return ServingState(pipeline=pipeline)


def release_freed_memory() -> None:
    """Collect garbage and hand the freed heap back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere)."""
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


RELOAD_TRIGGERS = ("startup", "signal", "admin")


class StateHolder:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.current: ServingState | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def reload(
        self, executor: Executor, trigger: str = "admin"
    ) -> tuple[ServingState, str | None]:
        """Load the bundle ``current`` points to, swap it in and update the metrics. Returns the
        new state and the previous index version. Raises the load error, logged and counted
        (the old state keeps serving). ``trigger``: one of ``RELOAD_TRIGGERS``; the
        ``startup`` load is not counted as a reload."""
        counted = trigger != "startup"
        async with self._lock:
            loop = asyncio.get_running_loop()
            previous = None if self.current is None else self.current.index_version
            try:
                state = await loop.run_in_executor(executor, load_state, self.settings)
            except Exception as exc:
                self.last_error = getattr(exc, "detail", None) or type(exc).__name__
                if counted:
                    self.metrics.reloads.labels(outcome="failed").inc()
                log.error(
                    "bundle load failed; the previous bundle (if any) keeps serving",
                    extra={"trigger": trigger, "detail": self.last_error},
                )
                raise
            self.current = state
            self.last_error = None
            if counted:
                self.metrics.reloads.labels(outcome="ok").inc()
            self.metrics.set_bundle(state.index_version, state.pipeline.variant)
            # The previous bundle (hundreds of MB of resident maps and encoder sessions) was
            # loaded by another pool thread; glibc keeps such freed memory in that thread's
            # arena unless asked: without this, repeated reloads grew a server to 2 GB.
            await loop.run_in_executor(executor, release_freed_memory)
            log.info(
                "bundle loaded",
                extra={
                    "index_version": state.index_version,
                    "previous_version": previous,
                    "trigger": trigger,
                },
            )
            return state, previous
