"""The FastAPI app factory: heavy objects are built in ``lifespan``, routes stay thin.

``create_app(settings)`` wires the embedded defaults of one process (``imagegenx serve``): SQLite
task store, local-folder blob store, the queue in the task database, the engine and its worker.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from imagegenx.api.http_metrics import HttpMetrics, RequestMetricsMiddleware
from imagegenx.api.ratelimit import Limiter, open_limiter
from imagegenx.api.ssrf import check_url
from imagegenx.api.webhooks import WebhookSender, new_secret
from imagegenx.config import Settings
from imagegenx.engine.service import Forbidden, QuotaExceeded, Service, ServiceBusy
from imagegenx.storage.database import StorageUnavailable
from imagegenx.types import UserError

log = logging.getLogger("imagegenx.api")


class RateLimited(UserError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"rate limit exceeded; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class Unauthorized(UserError):
    """No key, an unknown key or a revoked key (HTTP 401)."""


class NotFound(UserError):
    """No such task, model or LoRA for this key (HTTP 404)."""


@dataclass
class AppContext:
    settings: Settings
    service: Service
    limiter: Limiter
    engine: Any = None  # imagegenx.engine.engine.Engine where this process generates
    worker: Any = None
    ready: threading.Event = field(default_factory=threading.Event)
    a1111_options: dict[str, Any] = field(default_factory=dict)  # /sdapi/v1/options, in memory
    prompt_filter: Any = None  # vision.safety.PromptFilter when enabled
    relay: Any = None  # engine.service.StoreEventRelay on an API node without an engine


def create_app(settings: Settings | None = None, *, run_worker: bool = True) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = build_context(settings, run_worker=run_worker)
        app.state.ctx = ctx
        try:
            yield
        finally:
            close_context(ctx)

    app = FastAPI(
        title="imagegenx",
        version=_version(),
        description="Image generation service: ImageGenX v1, OpenAI Images and AUTOMATIC1111 APIs.",
        lifespan=lifespan,
    )
    _install_error_handlers(app)
    app.state.http_metrics = HttpMetrics()  # read by /metrics; request rate is what API nodes scale on
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.http_metrics)
    from imagegenx.api import (
        routes_a1111,
        routes_control,
        routes_openai,
        routes_ops,
        routes_portrait,
        routes_v1_catalog,
        routes_v1_submit,
        routes_v1_tasks,
        routes_web,
    )

    app.include_router(routes_ops.router)
    app.include_router(routes_v1_submit.router)  # v1 in this order: the OpenAPI schema's path order
    app.include_router(routes_v1_tasks.router)
    app.include_router(routes_v1_catalog.router)
    app.include_router(routes_control.router)
    app.include_router(routes_portrait.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_a1111.router)
    routes_web.install(app)  # the browser page at / and its static files under /web
    return app


def build_service(settings: Settings) -> Service:
    """The service every role shares (no torch): task store, job queue, cancel bus, blob store and
    webhook sender. The queue and the cancel bus are in-process, or NATS when ``queue.url`` is set."""
    from imagegenx.queue.factory import open_cancel_bus, open_queue
    from imagegenx.storage.blobs import BlobStore
    from imagegenx.storage.tasks import TaskStore

    store = TaskStore.from_settings(settings.storage)  # SQLite, or PostgreSQL with a pool
    service = Service(
        settings=settings,
        store=store,
        queue=open_queue(
            settings.queue, store.engine, lease_s=settings.service.lease_s, write_gate=store.writing
        ),
        blobs=BlobStore.from_settings(settings.storage),  # a local folder or S3
    )
    service.cancel_bus = open_cancel_bus(settings.queue)
    service.on_cancel = service.cancel_bus.publish  # workers subscribe (engine.worker.ServiceWorker)
    allowed = settings.service.allowed_private_hosts
    service.webhooks = WebhookSender(
        _webhook_secret(settings),
        retries=settings.service.webhook_retries,
        check=functools.partial(check_url, allow_hosts=allowed),
    )
    return service


def build_context(settings: Settings, *, run_worker: bool) -> AppContext:
    """``run_worker``: this process generates too (``serve``); otherwise it is an API node whose
    tasks run on ``imagegenx worker`` processes, and SSE hears of them through the task database."""
    service = build_service(settings)
    limiter = open_limiter(settings.service.rate_limit_url)  # in-process, or Redis shared by API nodes
    ctx = AppContext(settings, service, limiter, prompt_filter=_prompt_filter(settings))
    if run_worker:
        from imagegenx.engine.engine import Engine
        from imagegenx.engine.worker import ServiceWorker

        ctx.engine = Engine(settings)
        ctx.worker = ServiceWorker(service, ctx.engine)
        ctx.worker.start()
        threading.Thread(target=_warm_up, args=(ctx,), name="imagegenx-warmup", daemon=True).start()
    else:
        from imagegenx.engine.service import StoreEventRelay

        ctx.relay = StoreEventRelay(service.store, service.events)
        ctx.relay.start()
        ctx.ready.set()
    return ctx


def _prompt_filter(settings: Settings):
    """Rules plus the profanity model when installed (the `post` extra); rules alone otherwise."""
    if not settings.service.prompt_filter:
        return None
    from imagegenx.vision.safety import PromptFilter

    try:
        return PromptFilter()
    except ImportError:
        log.warning("alt-profanity-check is not installed: the prompt filter uses its rules only")
        return PromptFilter(profanity=False)


def close_context(ctx: AppContext) -> None:
    if ctx.relay is not None:
        ctx.relay.stop()
    if ctx.worker is not None:
        ctx.worker.stop()
    if ctx.engine is not None:
        ctx.engine.close()
    ctx.service.close()
    ctx.limiter.close()


def _warm_up(ctx: AppContext) -> None:
    """Load the default model and run one tiny image, so /readyz means the first request is fast."""
    if ctx.prompt_filter is not None:
        ctx.prompt_filter.warmup()
    if warm_up_engine(ctx.engine, ctx.settings):
        ctx.ready.set()


def warm_up_engine(engine: Any, settings: Settings) -> bool:
    """One tiny image of the default model, then every batch shape of ``EngineSettings.warmup_sizes``;
    False (logged) when that model is broken."""
    from imagegenx.engine.validation import TINY_SIZE_RANGE
    from imagegenx.engine.warmup import warm_up_sizes
    from imagegenx.types import JobSpec

    model = settings.models.default_model
    side = TINY_SIZE_RANGE[0] if model.startswith("random:tiny-") else settings.engine.min_size
    try:
        engine.submit(JobSpec("warm-up", model, width=side, height=side, steps=1, job_id="warm-up")).result()
    except Exception as exc:  # a broken default model must not stop the service answering
        log.error("warm-up of %s failed: %s", model, exc)
        return False
    try:
        warm_up_sizes(engine, model, settings.engine.warmup_dims)
    except Exception as exc:  # the model works: serve, and pay the missing shapes when they come
        log.error("warm-up of %s at %s failed: %s", model, settings.engine.warmup_sizes, exc)
    engine.save_compile_artifacts()  # the warm-up's compiles, for the next machine, even if this one dies
    return True


def _webhook_secret(settings: Settings) -> str:
    """One signing secret per installation, kept beside the spool folder."""
    path = Path(settings.storage.spool_dir).parent / "webhook_secret"
    if path.is_file():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    # API nodes and workers of one machine may start together: the first link wins, the rest read it.
    draft = path.with_name(f".webhook_secret.{uuid.uuid4().hex}")
    draft.write_text(new_secret())
    draft.chmod(0o600)
    with contextlib.suppress(FileExistsError):
        os.link(draft, path)
    draft.unlink()
    return path.read_text().strip()


def _version() -> str:
    from imagegenx import __version__

    return __version__


def error_body(status: int, message: str) -> dict:
    return {"code": status, "message": message, "data": None}


class ErrorBody(BaseModel):
    """Every error of the native API: the HTTP status again, a reason a person can act on, no data."""

    code: int
    message: str
    data: None = None


_ERROR_STATUSES = {
    400: "Bad request: the message says what to change",
    401: "Missing, unknown or revoked API key",
    403: "Not allowed for this key's tier",
    404: "No such task, model or LoRA for this key",
    422: "A field is malformed",
    429: "Rate limit or queue quota reached: see Retry-After",
    503: "Queue full or database unavailable: see Retry-After",
}


def error_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error statuses every route can answer, in a router's own shape.

    Errors are JSON whatever the route's own media type (an SSE stream, an image download): FastAPI
    files ``model`` under the route's media type, so the JSON body is documented explicitly too.
    """
    json_body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    return {
        status: {"model": model, "description": text, "content": json_body}
        for status, text in _ERROR_STATUSES.items()
    }


def _install_error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str, retry_after: float | None = None) -> JSONResponse:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
        return JSONResponse(error_body(status, message), status_code=status, headers=headers)

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        if isinstance(exc, RateLimited):
            return reply(429, str(exc), exc.retry_after)
        if isinstance(exc, QuotaExceeded):
            return reply(429, str(exc), 5)
        status = {Unauthorized: 401, Forbidden: 403, NotFound: 404}.get(type(exc), 400)
        return reply(status, str(exc))

    @app.exception_handler(ServiceBusy)
    async def busy(request: Request, exc: ServiceBusy) -> Response:
        return reply(503, str(exc), 5)

    @app.exception_handler(StorageUnavailable)
    async def storage_down(request: Request, exc: StorageUnavailable) -> Response:
        return reply(503, "the task database is unavailable; nothing was lost, retry shortly", 2)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return reply(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return reply(422, f"{where}: {first.get('msg', 'invalid request')}".strip(": "))
