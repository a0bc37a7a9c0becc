"""One error shape for every route, OpenAI's: ``{"error": {message, type, param, code}}``.

The official ``openai`` client reads that shape; the native routes use it too, adding
``errors`` (every bad line, with its line number and field) where a file was refused.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          409: "conflict_error", 413: "request_too_large", 422: "invalid_request_error",
          503: "service_unavailable"}


class SafeJSONResponse(JSONResponse):
    """A JSON response that cannot fail to encode: an error message may quote what the
    client sent, and a lone surrogate in it must not turn a 400 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8", "replace")


class ApiError(Exception):
    """An error answered to the client with ``status`` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.extra = (
            status, message, code, param, extra)

    def body(self) -> dict[str, Any]:
        err = {"message": self.message, "type": _TYPES.get(self.status, "api_error"),
               "param": self.param, "code": self.code, **self.extra}
        return {"error": err}


def not_found(kind: str, ident: str) -> ApiError:
    """The answer for a missing object *and* for one that belongs to another key."""
    return ApiError(404, f"No {kind} found with id {ident!r}.", code="not_found")


def install_handlers(app: FastAPI) -> None:
    """Map every exception the app can raise to OpenAI's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> SafeJSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return SafeJSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code=None)
        return SafeJSONResponse(err.body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> SafeJSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            offset = first.get("loc", ("body", "?"))[-1]
            err = ApiError(400, f"body: invalid JSON ({first.get('ctx', {}).get('error')} "
                                f"at character {offset})", code="invalid_json", param=None)
            return SafeJSONResponse(err.body(), status_code=400)
        msg = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
            for e in problems[:20])
        err = ApiError(400, msg or "invalid request", code="invalid_value", param=param)
        return SafeJSONResponse(err.body(), status_code=400)


def _nul_in_url(scope: Scope) -> ApiError | None:
    """The answer for a URL holding U+0000, which no id or cursor can contain and which
    PostgreSQL refuses to compare (a 500 from the driver, where SQLite simply finds
    nothing): a 404 for a path, a 400 naming the query parameter of a read. An upload's
    query parameters (POST) are its routes' own to check: a NUL there is a 400 naming
    the field, or a filename stored cleaned."""
    if "\x00" in scope.get("path", ""):
        return ApiError(404, "No such object: the path holds a NUL character (\\u0000).",
                        code="not_found")
    query: bytes = scope.get("query_string", b"")
    if scope.get("method") in ("GET", "HEAD", "DELETE") and (b"%00" in query
                                                             or b"\x00" in query):
        for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
            if "\x00" in name + value:
                param = name if "\x00" not in name else None
                return ApiError(400, f"{param or 'query'}: NUL characters (\\u0000) are not "
                                     "allowed", code="invalid_value", param=param)
    return None


class RejectNulInUrl:
    """ASGI middleware answering :func:`_nul_in_url`'s error before any route runs (every
    id lookup and list cursor at once, rather than a check in each)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (err := _nul_in_url(scope)) is not None:
            await SafeJSONResponse(err.body(), status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)
