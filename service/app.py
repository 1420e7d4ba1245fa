"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline

from mris.sandbox import DecodeSandbox
from mris.service.batching import MicroBatcher, search_by_state
from mris.service.config import Settings
from mris.service.logging_setup import configure_logging
from mris.service.metrics import Metrics
from mris.service.problems import install_problem_handlers
from mris.service.routes import router
from mris.service.state import StateHolder
from mris.viewer.routes import router as viewer_router
from mris.viewer.routes import static_files as viewer_static_files

log = logging.getLogger("mris.service")

# Same origin only; inline scripts and styles for Swagger UI's start-up script and Redoc's
# styles, blob: workers for Redoc, data: images for the viewer's radiograph preview.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; worker-src 'self' blob:; connect-src 'self'; "
    "font-src 'self' data:; frame-ancestors 'self'"
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure_logging(settings.log_level)
        app.state.executor = ThreadPoolExecutor(
            settings.worker_threads, thread_name_prefix="mris-cpu"
        )
        decoder = DecodeSandbox(
            settings.decode_workers, settings.decode_memory_mb, settings.decode_timeout_s
        )
        app.state.decoder = await asyncio.get_running_loop().run_in_executor(
            app.state.executor, decoder.start
        )
        compute = ThreadPoolExecutor(1, thread_name_prefix="mris-compute")
        app.state.batcher = MicroBatcher(
            search_by_state,
            compute,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_batch=metrics.batch_size.observe,
            on_depth=metrics.queue_depth.set,
        )
        await app.state.batcher.start()
        # Not bound to a name: this frame lives as long as the app and must not pin the bundle.
        try:
            await app.state.holder.reload(app.state.executor, "startup")
        except Exception:  # noqa: BLE001 - stay up, not ready; logged, and /readyz says why
            pass
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(
                signal.SIGHUP, lambda: asyncio.ensure_future(_reload_on_signal(app))
            )
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread (tests) or no SIGHUP on this platform
        yield
        try:
            loop.remove_signal_handler(signal.SIGHUP)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
        await app.state.batcher.stop()
        decoder.close()  # kills the decode workers, whatever they are decoding
        compute.shutdown(wait=False)
        app.state.executor.shutdown(wait=False)

    # /docs and /redoc with their scripts and styles served from the package (fastapi-offline),
    # not a CDN: hospitals and our own machines are offline.
    app = FastAPIOffline(
        title="MRIS",
        version="0.1.0",
        summary="MR cartilage thickness maps synthesized from knee radiographs by retrieval.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.holder = StateHolder(settings, metrics)
    install_problem_handlers(app)

    @app.middleware("http")
    async def same_origin_only(request: Request, call_next):
        """Pages served here (the viewer, /docs, /redoc) may load nothing from another host
        (Content-Security-Policy): they work offline, and a hospital's browser sends nothing
        elsewhere (Redoc's own logo, say, is not fetched from its CDN)."""
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        return response

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            elapsed = time.perf_counter() - started
            route = request.scope.get("route")
            name = getattr(route, "path", "unmatched")
            metrics.requests.labels(route=name, status=str(status)).inc()
            metrics.latency.labels(route=name, status=str(status)).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "route": name,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )

    app.include_router(router)
    # The viewer (mris.viewer): its page, static files and configuration carry no data and need
    # no token; its /preview and /neighbours routes are guarded like every data route.
    app.include_router(viewer_router)
    app.mount("/viewer/static", viewer_static_files(), name="viewer-static")
    return app


async def _reload_on_signal(app: FastAPI) -> None:
    """SIGHUP: the one reload path (``StateHolder.reload`` logs, counts and updates metrics)."""
    try:
        await app.state.holder.reload(app.state.executor, "signal")
    except Exception:  # noqa: BLE001 - logged and counted there; the previous bundle serves on
        pass
