"""Errors in FastAPI's default shape, `{"detail": ...}`, for routes that answer
another FastAPI app's API.

rembg's server (`rembg s`, rembg/commands/s_command.py) and image-layer-saas
(backend/main.py) are FastAPI apps: their clients read `detail` from an error
body (a string, or FastAPI's list of validation errors with 422). Routes built
with `DetailErrorRoute` answer that way; the rest of Strata keeps
application/problem+json. The status codes stay Strata's unless a subclass
maps them to what the other API documents.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, ClassVar

from fastapi import Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.problems import ProblemError
from serve_app.schemas import error_responses

# What these routes' errors look like in the OpenAPI document: `detail` is a string,
# or FastAPI's list of validation errors (422).
DETAIL_RESPONSES = error_responses("application/json", {
    "type": "object", "required": ["detail"], "properties": {"detail": {}}})


class DetailErrorRoute(APIRoute):
    """An APIRoute whose errors are `{"detail": ...}` bodies, as FastAPI's defaults."""

    # Strata status -> the status the other API uses for the same failure.
    remapped_statuses: ClassVar[dict[int, int]] = {}

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        remapped = self.remapped_statuses

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return await request_validation_exception_handler(request, exc)
            except ProblemError as exc:
                return JSONResponse({"detail": exc.detail}, status_code=remapped.get(exc.status, exc.status),
                                    headers=exc.headers or None)
            except StarletteHTTPException as exc:
                return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                                    headers=getattr(exc, "headers", None))

        return route


def validation_error(exc: ValidationError, sources: Mapping[str, str]) -> RequestValidationError:
    """A pydantic error in parameters read by hand, as the RequestValidationError
    FastAPI raises for declared ones. `sources` says where each parameter came
    from ("query" or "body"; "query" when not named)."""
    return RequestValidationError([
        {**error, "loc": (sources.get(str(error["loc"][0]), "query") if error["loc"] else "query", *error["loc"])}
        for error in exc.errors(include_url=False)
    ])


def missing_field(name: str, source: str = "body") -> RequestValidationError:
    """FastAPI's error for a required field the request lacks."""
    return RequestValidationError([{"type": "missing", "loc": (source, name), "msg": "Field required",
                                    "input": None}])


def refusal(request: Request, status: int, title: str, detail: str, headers: dict[str, str]) -> Response:
    """Access refused (401: no valid key, 429: rate limit) as `{"detail": ...}`
    (serve_app/access.py calls it for the paths of these APIs)."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)
