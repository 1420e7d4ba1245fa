"""Errors as ``application/problem+json`` (RFC 9457): one status and one clear detail each.

Every answer with a status of 400 or more goes through ``problem_response``, which never sends
an empty title or detail (an empty one becomes the status's reason phrase), so a client can
always show why. Starlette's own errors (404, 405, a malformed multipart body) keep their status
and detail; anything unexpected is a 500 whose detail says nothing about the input.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mris.errors import MrisError

log = logging.getLogger("mris.service")

PROBLEM_MEDIA_TYPE = "application/problem+json"


class ServiceProblem(Exception):
    """A problem the HTTP layer itself raises (413, 415, 401, 503...)."""

    def __init__(self, status: int, title: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers or {}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def problem_response(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    title = title or _phrase(status)
    detail = detail or title
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers=headers,
    )


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceProblem)
    async def _service_problem(request: Request, exc: ServiceProblem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, exc.headers)

    @app.exception_handler(MrisError)
    async def _mris_error(request: Request, exc: MrisError) -> JSONResponse:
        return problem_response(exc.http_status, exc.title, exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query"))
            parts.append(
                f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "")
            )
        return problem_response(422, "Invalid parameter", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem_response(
            exc.status_code, _phrase(exc.status_code), str(exc.detail or ""), exc.headers
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Never echo the exception text: it could carry file content.
        log.error("unexpected error", extra={"error_type": type(exc).__name__}, exc_info=False)
        return problem_response(500, "Internal error", "the server failed to process the request")
