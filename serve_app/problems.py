"""Errors as RFC 9457 problem details (`application/problem+json`).

Every error the API returns has the same shape: `type`, `title`, `status`,
`detail`, plus the request id so a user can quote it in a bug report.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

PROBLEM_MEDIA_TYPE = "application/problem+json"
logger = logging.getLogger("ray.serve")


class ProblemError(Exception):
    """An error the client should see, with a reason it can act on."""

    def __init__(self, status: int, title: str, detail: str, *, slug: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail
        self.slug = slug or title.lower().replace(" ", "-")
        self.headers = headers or {}


def problem_response(request: Request, status: int, title: str, detail: str, *, slug: str,
                     headers: dict[str, str] | None = None, **extra) -> JSONResponse:
    """A problem+json response for `request`."""
    body = {
        "type": f"urn:strata:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
        "request_id": request.headers.get("x-request-id"),
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_MEDIA_TYPE)


def _describe_validation_error(error: dict) -> str:
    where = ".".join(str(part) for part in error.get("loc", ()) if part not in ("query", "body"))
    return f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid")


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(request: Request) -> str:
    """Every method the app serves at this request's path, for a 405's `Allow`.

    Starlette names only the methods of the first route matching the path, so
    a path served by two routes (GET and DELETE) would advertise one. Each
    method is tried against the app's routes as the router would match it.
    """
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


def install_problem_handlers(app: FastAPI) -> None:
    """Make every error of `app` a problem+json response."""

    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError):
        return problem_response(request, exc.status, exc.title, exc.detail, slug=exc.slug, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        reasons = [_describe_validation_error(error) for error in exc.errors()]
        return problem_response(
            request, 422, "Invalid parameters", "; ".join(reasons), slug="invalid-parameters",
            errors=[{"loc": list(error.get("loc", ())), "msg": error.get("msg")} for error in exc.errors()],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        title = {404: "Not found", 405: "Method not allowed"}.get(exc.status_code, "HTTP error")
        detail = exc.detail if isinstance(exc.detail, str) else title
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405 and (allowed := _allowed_methods(request)):
            headers["Allow"] = allowed
        return problem_response(request, exc.status_code, title, detail,
                                slug=title.lower().replace(" ", "-"), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(request, 500, "Internal error",
                                "the service failed unexpectedly; the request id identifies it in the logs",
                                slug="internal-error")
