"""Operations routes: liveness and readiness (no key needed), Prometheus metrics (an API key or the
metrics token: they name models, LoRAs and load, which is not for anonymous callers)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from imagegenx.api.app import ErrorBody, error_responses
from imagegenx.api.deps import ContextDep, api_key, bearer_scheme, key_header

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz", summary="Ready: models loaded and warm", responses={503: {"description": "Not ready yet"}}
)
def readyz(ctx: ContextDep) -> Response:
    if ctx.ready.is_set():
        return JSONResponse({"status": "ready"})
    return JSONResponse({"status": "warming up"}, status_code=503, headers={"Retry-After": "2"})


def metrics_access(
    ctx: ContextDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    header: Annotated[str | None, Depends(key_header)],
) -> None:
    """The scraper's token (compared in constant time), else any valid API key."""
    token = ctx.settings.service.metrics_token
    if token and bearer is not None and hmac.compare_digest(bearer.credentials.encode(), token.encode()):
        return
    api_key(ctx, bearer, header)


@router.get(
    "/metrics",
    summary="Prometheus metrics (an API key or the metrics token)",
    response_class=Response,
    responses={k: v for k, v in error_responses(ErrorBody).items() if k in (401, 503)},
    dependencies=[Depends(metrics_access)],
)
def metrics(ctx: ContextDep, request: Request) -> Response:
    registry = CollectorRegistry()
    registry.register(_QueueCollector(ctx))
    body = generate_latest(registry) + generate_latest(request.app.state.http_metrics.registry)
    if ctx.engine is not None:
        body += generate_latest(ctx.engine.metrics.registry)
    limiter_registry = getattr(ctx.limiter, "registry", None)  # the Redis limiter's error count
    if limiter_registry is not None:
        body += generate_latest(limiter_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


class _QueueCollector(Collector):
    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def collect(self):
        queue = self.ctx.service.queue
        depth = GaugeMetricFamily("imagegenx_queue_depth", "Jobs waiting, by priority lane", labels=["lane"])
        for lane, count in sorted(queue.depth().items()):
            depth.add_metric([f"P{lane}"], count)
        yield depth
        wait = GaugeMetricFamily(
            "imagegenx_queue_oldest_wait_seconds", "Wait of the oldest job, by lane", labels=["lane"]
        )
        for lane, seconds in sorted(queue.oldest_wait().items()):
            wait.add_metric([f"P{lane}"], seconds)
        yield wait
