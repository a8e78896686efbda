"""Error bodies in each compatible API's own shape (OpenAI's, AUTOMATIC1111's) and request-field errors.

``shaped_errors(render)`` is a route class for one router: its errors keep the status (and Retry-After)
the app's handlers choose, but get ``render``'s body. ``invalid`` and ``validated`` report errors about
the client's own field names, as FastAPI reports its validation errors.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError

from imagegenx.api.schemas import GenerateParams

log = logging.getLogger("imagegenx.api")

# (request, exception, status the app's handler chose, its message) → (status, body)
ErrorRenderer = Callable[[Request, Exception, int, str], tuple[int, dict[str, Any]]]


class TaskFailure(Exception):
    """A synchronous request's tasks ended badly: an image failed (500), nothing in time (504), ..."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def native_error(request: Request, exc: Exception) -> tuple[int, str, dict[str, str]] | None:
    """(status, message, headers) of the app's own answer to ``exc``; None when no handler takes it.

    Asking the app's handlers keeps one status mapping for all three APIs.
    """
    if isinstance(exc, TaskFailure):
        return exc.status, str(exc), {}
    handlers = request.app.exception_handlers
    handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), None)
    if handler is None:
        return None
    response = handler(request, exc)
    if inspect.isawaitable(response):
        response = await response
    try:
        body = json.loads(response.body)
    except (AttributeError, ValueError):
        body = None
    body = body if isinstance(body, dict) else {}
    message = body.get("message") or body.get("detail") or str(exc) or type(exc).__name__
    headers = {k: v for k, v in response.headers.items() if k.lower() == "retry-after"}
    return response.status_code, str(message), headers


def error_param(exc: Exception) -> str | None:
    """The request field a validation error is about (``size``, ``n``), as the app's message names it."""
    if not isinstance(exc, RequestValidationError) or not exc.errors():
        return None
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":  # its loc is a position in the body, not a field
        return None
    return ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None


def shaped_errors(render: ErrorRenderer) -> type[APIRoute]:
    """A route class whose errors (from dependencies, validation or the route) get ``render``'s body.

    Set on a router, it changes error bodies for that router's paths only; statuses and Retry-After
    stay those of the app's handlers.
    """

    class ShapedErrorRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except Exception as exc:
                    native = await native_error(request, exc)
                    if native is None:  # a bug: still answer in this API's shape, and log it
                        log.exception("unhandled error in %s %s", request.method, request.url.path)
                        native = (500, "internal server error", {})
                    status, message, headers = native
                    status, body = render(request, exc, status, message)
                    return JSONResponse(body, status_code=status, headers=headers)

            return run

    return ShapedErrorRoute


def invalid(field: str, message: str) -> RequestValidationError:
    """A validation error about one request field, reported like FastAPI's own."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message}])


P = TypeVar("P", bound=GenerateParams)


def validated(model: type[P], values: dict[str, Any], names: dict[str, str]) -> P:
    """``model`` from ``values``; errors name the client's fields (``names``: our field → theirs)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        errors = [
            {**e, "loc": ("body", *(names.get(str(p), p) for p in e["loc"]))}
            for e in exc.errors(include_url=False, include_context=False)
        ]
        raise RequestValidationError(errors) from None
