"""Routes: they only translate HTTP to pipeline calls (the work lives in mris.pipeline)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from mris.dicom import SourceIdentity
from mris.pipeline import KneeResult
from mris.render import render_results_png
from mris.service.answers import (
    NPZ_MEDIA_TYPE,
    ZIP_MEDIA_TYPE,
    dicom_zip_response,
    json_response,
    npz_response,
    retrieval_payload,
    synthesis_payload,
)
from mris.service.batching import Overloaded
from mris.service.deps import (
    Authorized,
    HolderDep,
    MetricsDep,
    ServedStateDep,
    SettingsDep,
    Upload,
    UploadDep,
    Workers,
    WorkersDep,
)
from mris.service.problems import ServiceProblem
from mris.service.schemas import (
    BINARY_SCHEMA,
    RetrievalResponse,
    SynthesisResponse,
    problem_responses,
    upload_openapi,
)
from mris.service.state import ServingState

router = APIRouter()

ERRORS = problem_responses(
    {
        400: "Unreadable or unusable DICOM, or a malformed request",
        401: "Missing or wrong bearer token",
        413: "Too large",
        415: "Wrong media type",
        422: "Bad parameters, or no knee found",
        503: "Not ready, overloaded or timed out",
    }
)
_UPLOAD_BODY = upload_openapi()  # options and body, from mris.options.SynthesisOptions
_GUARDED = {401: ERRORS[401]}


@router.get("/healthz", tags=["operations"])
async def healthz() -> dict:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", tags=["operations"], responses={503: ERRORS[503]})
async def readyz(holder: HolderDep) -> JSONResponse:
    """Models and index loaded."""
    if holder.current is None:
        detail = "the model and index are not loaded"
        if holder.last_error:
            detail += f": {holder.last_error}"
        raise ServiceProblem(503, "Not ready", detail, {"Retry-After": "5"})
    return JSONResponse({"status": "ready", "index_version": holder.current.index_version})


@router.get(
    "/info",
    tags=["operations"],
    dependencies=[Authorized],
    responses={**_GUARDED, 503: ERRORS[503]},
)
async def info(state: ServedStateDep) -> dict:
    """The model card and the index card of the bundle being served."""
    return state.pipeline.info()


@router.get(
    "/metrics",
    tags=["operations"],
    dependencies=[Authorized],
    responses=_GUARDED,
    response_class=PlainTextResponse,
)
async def metrics(registry: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(registry.render(), media_type="text/plain; version=0.0.4")


@router.post(
    "/admin/reload",
    tags=["operations"],
    dependencies=[Authorized],
    responses={**_GUARDED, 503: ERRORS[503]},
)
async def reload(holder: HolderDep, workers: WorkersDep) -> dict:
    """Load the bundle `current` points to, check it against the encoders, swap atomically."""
    try:  # the one reload path: it also counts the reload and updates the metrics
        state, previous = await holder.reload(workers.executor, "admin")
    except Exception as exc:
        detail = getattr(exc, "detail", None) or "the new bundle could not be loaded"
        raise ServiceProblem(
            503, "Reload failed", f"{detail}; the previous bundle keeps serving"
        ) from None
    return {"index_version": state.index_version, "previous_version": previous}


async def _run(
    workers: Workers, timeout_s: float, state: ServingState, upload: Upload, with_maps: bool
) -> tuple[list[KneeResult], SourceIdentity | None]:
    """The request's results and its source's identity (for a DICOM answer; never logged)."""
    options = upload.params.request_options()  # checked by read_upload
    loop = asyncio.get_running_loop()
    pipeline = state.pipeline

    async def work() -> tuple[list[KneeResult], SourceIdentity | None]:
        # Decoding runs in the memory- and time-bounded worker processes (mris.sandbox).
        radiograph = await workers.decoder.read_async(
            upload.data, options.spacing_mm, pipeline.limits
        )
        prepared = await loop.run_in_executor(
            workers.executor, pipeline.prepare, radiograph, options
        )
        try:
            hits = await workers.batcher.submit_many(
                [(state, roi.image, options.k) for roi in prepared.rois]
            )
        except Overloaded as exc:
            raise ServiceProblem(
                503,
                "Overloaded",
                f"the service is busy ({exc}); retry shortly",
                {"Retry-After": "1"},
            ) from None
        results = await loop.run_in_executor(
            workers.executor,
            pipeline.assemble,
            prepared,
            hits,
            options.k,
            with_maps,
            options.nan_rule,
        )
        return results, prepared.source

    try:
        return await asyncio.wait_for(work(), timeout_s)
    except asyncio.TimeoutError:
        raise ServiceProblem(
            503,
            "Timed out",
            "the request took longer than the configured limit",
            {"Retry-After": "1"},
        ) from None


@router.post(
    "/synthesize",
    tags=["synthesis"],
    dependencies=[Authorized],
    response_model=SynthesisResponse,
    responses={
        **ERRORS,
        200: {
            "content": {
                NPZ_MEDIA_TYPE: {"schema": BINARY_SCHEMA},
                "image/png": {"schema": BINARY_SCHEMA},
                ZIP_MEDIA_TYPE: {"schema": BINARY_SCHEMA},
            }
        },
    },
    openapi_extra=_UPLOAD_BODY,
)
async def synthesize(
    upload: UploadDep, state: ServedStateDep, workers: WorkersDep, settings: SettingsDep
) -> Response:
    """Synthesize the femoral (fc) and tibial (tc) thickness maps of each knee (eq. 4: the
    similarity-weighted average of the k nearest database maps) with a per-pixel weighted
    standard deviation. `nan_rule`: which pixels are cartilage (all or majority).
    `format`: json (base64 float32), npz, png, or dicom (a zip of a Secondary Capture and a
    TID 1500 SR in the source's study)."""
    results, source = await _run(workers, settings.request_timeout_s, state, upload, with_maps=True)
    params = upload.params

    def render() -> Response:
        # base64, JSON and PNG encoding are CPU work: off the event loop, like the rest.
        payload = synthesis_payload(
            results,
            state.index_version,
            state.pipeline.variant,
            params.k,
            params.nan_rule,
            state.pipeline.coverage,
        )
        if params.format == "npz":
            return npz_response(results, payload)
        if params.format == "png":
            title = (
                f"Synthesized from the radiograph (research use): k = {params.k}, "
                f"{state.pipeline.variant}, index {state.index_version}"
            )
            png = render_results_png(results, title=title, coverage=state.pipeline.coverage)
            return Response(png, media_type="image/png")
        if params.format == "dicom":
            return dicom_zip_response(
                results, source, state.pipeline.versions, params.k, state.pipeline.coverage
            )
        return json_response(payload)

    return await asyncio.get_running_loop().run_in_executor(workers.executor, render)


@router.post(
    "/retrieve",
    tags=["synthesis"],
    dependencies=[Authorized],
    response_model=RetrievalResponse,
    responses=ERRORS,
    openapi_extra=_UPLOAD_BODY,
)
async def retrieve(
    upload: UploadDep, state: ServedStateDep, workers: WorkersDep, settings: SettingsDep
) -> JSONResponse:
    """The k nearest database knee-visits of each knee: ids, similarities and metadata, no maps."""
    results, _ = await _run(workers, settings.request_timeout_s, state, upload, with_maps=False)
    payload = retrieval_payload(
        results, state.index_version, state.pipeline.variant, upload.params.k
    )
    return await asyncio.get_running_loop().run_in_executor(
        workers.executor, json_response, payload
    )
