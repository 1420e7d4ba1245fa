"""The viewer's routes (mounted by ``mris.service.app``): the page and its static files, its
configuration, the radiograph preview and a neighbour's maps."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from mris.constants import CARTILAGES
from mris.dicom import Radiograph
from mris.service.answers import b64_float32
from mris.service.deps import Authorized, ServedStateDep, SettingsDep, UploadDep, WorkersDep
from mris.service.problems import ServiceProblem
from mris.service.routes import ERRORS
from mris.service.schemas import problem_responses, upload_openapi

STATIC = Path(__file__).parent / "static"
PREVIEW_MAX_PX = 1024
"""Longest side of the radiograph preview (the page scales the ROI boxes by ``scale``)."""

router = APIRouter()
_PREVIEW_ERRORS = {code: ERRORS[code] for code in (400, 401, 413, 415, 422, 503)}
_NEIGHBOUR_ERRORS = {
    **problem_responses({404: "No such knee-visit in the served index"}),
    401: ERRORS[401],
    503: ERRORS[503],
}


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/viewer/")


@router.get("/viewer/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/viewer/config", tags=["viewer"])
async def config() -> dict:
    """What the page draws with: the thickness and uncertainty scales and colour maps of
    ``mris.render`` (256 RGB entries each), and the cartilages."""
    from matplotlib import colormaps

    from mris.render import STD_MAX_MM, THICKNESS_CMAP, THICKNESS_MAX_MM, UNCERTAINTY_CMAP

    def lut(name: str) -> list[list[int]]:
        rgba = colormaps[name](np.linspace(0.0, 1.0, 256))
        return np.round(rgba[:, :3] * 255).astype(int).tolist()

    return {
        "cartilages": list(CARTILAGES),
        "thickness": {
            "max_mm": THICKNESS_MAX_MM,
            "colormap": THICKNESS_CMAP,
            "lut": lut(THICKNESS_CMAP),
        },
        "uncertainty": {
            "max_mm": STD_MAX_MM,
            "colormap": UNCERTAINTY_CMAP,
            "lut": lut(UNCERTAINTY_CMAP),
        },
    }


def preview_png(radiograph: Radiograph, max_px: int = PREVIEW_MAX_PX) -> tuple[bytes, float]:
    """The radiograph windowed to its 0.5th-99.5th percentiles (bone bright) as an 8-bit PNG
    whose longest side is at most ``max_px``; returns (PNG, preview pixels per source pixel)."""
    from PIL import Image

    pixels = np.asarray(radiograph.pixels, dtype=np.float32)
    low, high = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - low) / max(float(high - low), 1e-6), 0.0, 1.0)
    image = Image.fromarray(np.round(scaled * 255).astype(np.uint8))
    scale = min(1.0, max_px / max(image.size))
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        scale = image.width / pixels.shape[1]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue(), scale


@router.post(
    "/preview",
    tags=["viewer"],
    dependencies=[Authorized],
    responses=_PREVIEW_ERRORS,
    openapi_extra=upload_openapi(),
)
async def preview(
    upload: UploadDep, state: ServedStateDep, workers: WorkersDep, settings: SettingsDep
) -> JSONResponse:
    """The radiograph as the service decodes it (in the decode sandbox), as a PNG preview with
    its size, spacing and the preview's scale (preview pixels per image pixel), for drawing the
    knee ROIs of a /synthesize answer on it. No DICOM attribute is echoed."""
    options = upload.params.request_options()

    async def work() -> dict:
        radiograph = await workers.decoder.read_async(
            upload.data, options.spacing_mm, state.pipeline.limits
        )
        loop = asyncio.get_running_loop()
        png, scale = await loop.run_in_executor(workers.executor, preview_png, radiograph)
        rows, columns = radiograph.pixels.shape
        return {
            "rows": int(rows),
            "columns": int(columns),
            "spacing_mm": float(radiograph.spacing_mm),
            "spacing_source": radiograph.spacing_source,
            "scale": scale,
            "png": base64.b64encode(png).decode("ascii"),
        }

    try:
        return JSONResponse(await asyncio.wait_for(work(), settings.request_timeout_s))
    except asyncio.TimeoutError:
        raise ServiceProblem(
            503, "Timed out", "the preview took longer than the configured limit"
        ) from None


@router.get(
    "/neighbours/{pair_id}", tags=["viewer"], dependencies=[Authorized], responses=_NEIGHBOUR_ERRORS
)
async def neighbour(pair_id: str, state: ServedStateDep) -> dict:
    """A knee-visit of the served index: its metadata (subject, side, visit, KL grade) and its
    femoral and tibial thickness maps (float32 little-endian base64, NaN outside cartilage)."""
    index = state.pipeline.index
    try:
        row = index.rows.row_of(pair_id)
    except KeyError:
        raise ServiceProblem(
            404, "Not found", "the served index holds no knee-visit with this id"
        ) from None
    meta = index.rows[row].to_dict()
    maps = {}
    for name in CARTILAGES:
        if name in index.maps:
            thickness = index.neighbour_maps(name, np.array([row]))[0]
            maps[name] = {
                "shape": list(thickness.shape),
                "unit": "mm",
                "dtype": "float32-le",
                "data": b64_float32(thickness),
            }
    public = {key: meta[key] for key in ("subject_id", "side", "visit_month", "klg")}
    return {"id": pair_id, **public, "maps": maps}
