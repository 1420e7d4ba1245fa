"""Ray, for the jobs that outgrow one machine (``mris synthesize-batch --engine ray``, ``mris
index build --engine ray``): connecting to a cluster, or starting a local one. Ray is in the
``scale`` extra; nothing else in the package imports it.

``connected(address)``: with ``address`` (``HOST:PORT`` of a running cluster's head, e.g. one
started by ``ray start --head``, or ``auto``) the job joins that cluster; without, Ray starts a
local cluster in this process with this machine's CPUs (and GPUs) and stops it at the end. The
package must be importable by the cluster's workers (the same environment on every node).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from mris.errors import BadParameter


def require_ray() -> ModuleType:
    """The ``ray`` module, with Ray Data; a clear error when the ``scale`` extra is missing."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise BadParameter(
            f"--engine ray needs Ray ({exc.name} is missing): pip install -e '.[scale]'"
        ) from None
    return ray


@contextmanager
def connected(address: str | None = None, num_cpus: int | None = None) -> Iterator[ModuleType]:
    """``ray`` connected to the cluster at ``address`` (or a new local one), disconnected on
    exit. Ray Data's own progress bars are off: the command draws its own."""
    ray = require_ray()
    already = ray.is_initialized()
    if not already:
        options = {"logging_level": logging.WARNING, "log_to_driver": True}
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, **options)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = False
    try:
        yield ray
    finally:
        if not already:
            ray.shutdown()


def map_with_actors(
    ray: ModuleType,
    items: list[dict[str, Any]],
    actor: type,
    constructor_kwargs: dict[str, Any],
    *,
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
):
    """``items`` as a Ray dataset of one block each, mapped one item per call by a pool of
    ``actor`` (constructed once per actor with ``constructor_kwargs``): at most ``actors`` of
    them (never more than there are items), each holding ``cpus_per_actor`` CPUs and
    ``gpus_per_actor`` GPUs (0: a CPU actor). Ray restarts a lost actor and retries its item."""
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        actor,
        fn_constructor_kwargs=constructor_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=max(1, min(actors, len(items)))),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )


__all__ = ["connected", "map_with_actors", "require_ray"]
