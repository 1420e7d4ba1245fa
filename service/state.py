"""What the service serves (a loaded pipeline) and its atomic replacement on reload.

Every request takes a reference to the current ``ServingState`` when it starts and uses it to
the end, so a reload swaps the reference for new requests while in-flight ones finish on the
bundle they began with. A failed load leaves the old state serving.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

from mris.service.config import Settings

from mris.pipeline import Pipeline

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


class StateHolder:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.current: ServingState | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()

    async def reload(self, executor: Executor) -> tuple[ServingState, str | None]:
        """Load the bundle ``current`` points to and swap it in. Returns the new state and the
        previous index version. Raises the load error (the old state keeps serving)."""
        async with self._lock:
            loop = asyncio.get_running_loop()
            previous = None if self.current is None else self.current.index_version
            try:
                state = await loop.run_in_executor(executor, load_state, self.settings)
            except Exception as exc:
                self.last_error = getattr(exc, "detail", None) or type(exc).__name__
                raise
            self.current = state
            self.last_error = None
            # The previous bundle (hundreds of MB of resident maps and encoder sessions) was
            # loaded by another pool thread; glibc keeps such freed memory in that thread's
            # arena unless asked: without this, repeated reloads grew a server to 2 GB.
            await loop.run_in_executor(executor, release_freed_memory)
            log.info(
                "bundle loaded",
                extra={"index_version": state.index_version, "previous_version": previous},
            )
            return state, previous
