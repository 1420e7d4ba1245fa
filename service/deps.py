"""Shared route dependencies: authentication, the served state, and reading the radiograph
upload (multipart field ``file`` or an ``application/dicom`` body) with its options."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Query, Request
from mris.service.problems import ServiceProblem
from mris.service.schemas import SynthesisParams
from mris.service.state import ServingState
from pydantic import ValidationError

DICOM_MEDIA_TYPES = ("application/dicom", "application/octet-stream")
OPTION_NAMES = tuple(SynthesisParams.model_fields)


def require_token(request: Request) -> None:
    token = request.app.state.settings.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), token):
        raise ServiceProblem(
            401,
            "Unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )


def serving_state(request: Request) -> ServingState:
    state = request.app.state.holder.current
    if state is None:
        raise ServiceProblem(
            503, "Not ready", "the model and index are not loaded yet", {"Retry-After": "5"}
        )
    return state


async def _read_body_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ServiceProblem(413, "Request too large", _too_large(limit))
        except ValueError:
            raise ServiceProblem(400, "Bad request", "Content-Length is not a number") from None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceProblem(413, "Request too large", _too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit / 2**20:.0f} MiB"


class Upload:
    """The radiograph bytes and the validated options of one request."""

    def __init__(self, data: bytes, params: SynthesisParams):
        self.data = data
        self.params = params


async def read_upload(
    request: Request,
    knees: Annotated[str | None, Query(description="both | left | right")] = None,
    k: Annotated[str | None, Query(description="neighbours, 1..100 (default 20)")] = None,
    keypoints: Annotated[
        str | None, Query(description='JSON {"left": [x, y], "right": [x, y]} in pixels')
    ] = None,
    spacing_mm: Annotated[str | None, Query(description="mm per pixel if the file has none")] = None,
    format: Annotated[str | None, Query(description="json | npz | png")] = None,
) -> Upload:
    settings = request.app.state.settings
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options: dict[str, str] = {
        name: value
        for name, value in zip(OPTION_NAMES, (knees, k, keypoints, spacing_mm, format))
        if value is not None
    }
    if media_type == "multipart/form-data":
        body = await _read_body_limited(request, settings.max_upload_bytes)
        request._body = body  # starlette's form parser reads the cached body
        try:
            form = await request.form(max_files=2, max_fields=20)
        except Exception as exc:  # malformed multipart of any kind
            raise ServiceProblem(400, "Bad request", "the multipart body could not be parsed") from exc
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ServiceProblem(
                422, "Invalid parameter", "multipart uploads need the DICOM in a form field named 'file'"
            )
        data = await upload.read()
        for name in OPTION_NAMES:
            value = form.get(name)
            if isinstance(value, str) and value != "":
                options[name] = value  # a form field wins over a query parameter of the same name
    elif media_type in DICOM_MEDIA_TYPES:
        data = await _read_body_limited(request, settings.max_upload_bytes)
    else:
        shown = media_type or "none"
        raise ServiceProblem(
            415,
            "Unsupported media type",
            f"send the radiograph as multipart/form-data (field 'file') or as application/dicom, not {shown}",
        )
    if not data:
        raise ServiceProblem(400, "Unreadable DICOM", "the uploaded file is empty")
    options.setdefault("k", str(settings.default_k))
    try:
        params = SynthesisParams.model_validate(options)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ServiceProblem(422, "Invalid parameter", details) from None
    return Upload(data, params)


Authorized = Depends(require_token)
