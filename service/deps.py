"""Shared route dependencies: authentication, the served state, the app's shared objects, and
reading the radiograph upload (multipart field ``file`` or an ``application/dicom`` body) with
its options.

Routes take what they need as the ``Annotated`` aliases below (``SettingsDep``, ``HolderDep``,
``MetricsDep``, ``WorkersDep``, ``ServedStateDep``, ``UploadDep``); this module is the one place
that reads ``app.state`` for them. ``Authorized`` goes in a route's ``dependencies``, so the token
is checked before the upload is read.

Decisions (each answer below is problem+json with a detail that names what was wrong):

- The bearer token is compared as bytes, in constant time (``hmac.compare_digest``). Starlette
  decodes header bytes as latin-1, so encoding the given value back with latin-1 restores the
  exact bytes sent; the configured token is encoded as UTF-8 (what a client sends for it). Any
  bytes at all give 401, never an exception.
- Options come from the query string and, with a multipart upload, from text fields; a form
  field wins over a query parameter of the same name, but an invalid query parameter is refused
  even then (it is checked before the body is read). Before anything is parsed: an unknown
  option, an option given twice in one place, or an option text longer than its limit
  (``mris.options.option_text_limit``) is refused with 422. An empty value means "not given"
  (HTML forms send blank fields). ``SynthesisOptions.parse`` then checks types, ranges and the
  keypoints' JSON (422), as it does for the CLI.
- Multipart: at most one file part and ``MAX_FORM_FIELDS`` text parts, text parts of at most
  ``MAX_FORM_PART_BYTES`` (413); ``file`` must be a file part and the options text parts (422).
- The body is read up to ``max_upload_bytes`` (413, also when Content-Length announces more); a
  Content-Length that is not a number is 400 (uvicorn's parser refuses most before we see them).
"""

from __future__ import annotations

import hmac
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from mris.errors import BadParameter
from mris.options import OPTION_NAMES, SynthesisOptions, option_text_limit
from mris.sandbox import DecodeSandbox
from mris.service.batching import MicroBatcher
from mris.service.config import Settings
from mris.service.metrics import Metrics
from mris.service.problems import ServiceProblem
from mris.service.schemas import DICOM_MEDIA_TYPES
from mris.service.state import ServingState, StateHolder

MAX_FORM_FIELDS = 16
MAX_FORM_PART_BYTES = 1 << 20  # a text part; the longest legitimate one (keypoints) is 256 chars
_SHOWN_NAME_CHARS = 40


@dataclass(frozen=True)
class Workers:
    """What the lifespan starts and the requests share: the CPU thread pool (decoding hand-off,
    ROIs, synthesis, encoding the answer), the decode sandbox and the micro-batcher."""

    executor: Executor
    decoder: DecodeSandbox
    batcher: MicroBatcher


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _holder(request: Request) -> StateHolder:
    return request.app.state.holder


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _workers(request: Request) -> Workers:
    app_state = request.app.state
    return Workers(app_state.executor, app_state.decoder, app_state.batcher)


SettingsDep = Annotated[Settings, Depends(_settings)]
HolderDep = Annotated[StateHolder, Depends(_holder)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
WorkersDep = Annotated[Workers, Depends(_workers)]


# Declares the scheme in the OpenAPI document only; require_token reads the header itself.
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="MRIS_API_TOKEN, when the service has one: every route but /healthz and /readyz.",
)


def require_token(
    request: Request,
    settings: SettingsDep,
    _declared: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)] = None,
) -> None:
    token = settings.token
    if token is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    # latin-1 round-trips every header byte; compare_digest on bytes takes any content.
    matches = hmac.compare_digest(given.strip().encode("latin-1"), token.encode("utf-8"))
    if scheme.lower() != "bearer" or not matches:
        raise ServiceProblem(
            401,
            "Unauthorized",
            "a valid bearer token is required (Authorization: Bearer <token>)",
            {"WWW-Authenticate": "Bearer"},
        )


def serving_state(holder: HolderDep) -> ServingState:
    state = holder.current
    if state is None:
        raise ServiceProblem(
            503, "Not ready", "the model and index are not loaded yet", {"Retry-After": "5"}
        )
    return state


async def _read_body_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ServiceProblem(400, "Bad request", "Content-Length is not a number") from None
        if declared_bytes > limit:
            raise ServiceProblem(413, "Request too large", _too_large(limit))
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ServiceProblem(413, "Request too large", _too_large(limit))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit / 2**20:g} MiB"


def _shown(name: str) -> str:
    """A caller-chosen name, safe to put in a detail: short and quoted."""
    return repr(name[:_SHOWN_NAME_CHARS] + ("..." if len(name) > _SHOWN_NAME_CHARS else ""))


def _collect_options(items: list[tuple[str, str]], where: str) -> dict[str, str]:
    """Known, single, not over-long option texts from (name, value) pairs; 422 otherwise."""
    options: dict[str, str] = {}
    seen: set[str] = set()
    for name, value in items:
        if name not in OPTION_NAMES:
            raise ServiceProblem(
                422,
                "Invalid parameter",
                f"unknown {where} {_shown(name)}; the options are {', '.join(OPTION_NAMES)}",
            )
        if name in seen:
            raise ServiceProblem(
                422, "Invalid parameter", f"{name}: given more than once as a {where}"
            )
        seen.add(name)
        limit = option_text_limit(name)
        if len(value) > limit:
            raise ServiceProblem(
                422, "Invalid parameter", f"{name}: at most {limit} characters, got {len(value)}"
            )
        if value != "":
            options[name] = value
    return options


async def _read_multipart(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    body = await _read_body_limited(request, limit)
    request._body = body  # starlette's form parser reads the cached body
    try:
        form = await request.form(
            max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FORM_PART_BYTES
        )
    except StarletteHTTPException as exc:  # starlette's reason: boundary, too many parts...
        status = 413 if "maximum size" in str(exc.detail) else 400
        raise ServiceProblem(
            status, "Bad request", f"the multipart body could not be read: {exc.detail}"
        ) from None
    except Exception:  # noqa: BLE001 - python-multipart raises many kinds on a malformed body
        raise ServiceProblem(400, "Bad request", "the multipart body could not be parsed") from None
    texts: list[tuple[str, str]] = []
    upload = None
    for name, value in form.multi_items():
        if name == "file":
            if not isinstance(value, UploadFile):
                raise ServiceProblem(
                    422,
                    "Invalid parameter",
                    "file: must be a file part (the DICOM), not a text field",
                )
            upload = value
        elif isinstance(value, UploadFile):
            raise ServiceProblem(
                422, "Invalid parameter", f"{_shown(name)}: must be a text field, not a file part"
            )
        else:
            texts.append((name, value))
    if upload is None:
        raise ServiceProblem(
            422,
            "Invalid parameter",
            "multipart uploads need the DICOM in a form field named 'file'",
        )
    options = _collect_options(texts, "form field")
    return await upload.read(), options


class Upload:
    """The radiograph bytes and the validated options of one request."""

    def __init__(self, data: bytes, params: SynthesisOptions):
        self.data = data
        self.params = params


async def read_upload(request: Request, settings: SettingsDep) -> Upload:
    """The options are documented in the OpenAPI schema by ``schemas.upload_openapi``."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options = _collect_options(request.query_params.multi_items(), "query parameter")
    _validated(options)  # refused before the body is read, and even where a form field overrides
    if media_type == "multipart/form-data":
        data, form_options = await _read_multipart(request, settings.max_upload_bytes)
        options.update(form_options)  # a form field wins over a query parameter of the same name
    elif media_type in DICOM_MEDIA_TYPES:
        data = await _read_body_limited(request, settings.max_upload_bytes)
    else:
        shown = _shown(media_type) if media_type else "none"
        raise ServiceProblem(
            415,
            "Unsupported media type",
            "send the radiograph as multipart/form-data (field 'file') or as "
            f"{' or '.join(DICOM_MEDIA_TYPES)}, not {shown}",
        )
    if not data:
        raise ServiceProblem(400, "Unreadable DICOM", "the uploaded file is empty")
    options.setdefault("k", str(settings.default_k))
    return Upload(data, _validated(options))


def _validated(options: dict[str, str]) -> SynthesisOptions:
    try:
        return SynthesisOptions.parse(**options)
    except BadParameter as exc:
        raise ServiceProblem(422, "Invalid parameter", exc.detail) from None


Authorized = Depends(require_token)
ServedStateDep = Annotated[ServingState, Depends(serving_state)]
UploadDep = Annotated[Upload, Depends(read_upload)]
