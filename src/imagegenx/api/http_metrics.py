"""HTTP request metrics of one app, in a registry of its own: the request rate API nodes scale on.

A plain ASGI middleware (so SSE streams pass through untouched). Requests are labelled by the route's
path template (``/api/v1/tasks/{task_id}``), never the raw path, so the label set stays bounded.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imagegenx_http_requests",
            "HTTP requests answered, by method, route template and status code",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "imagegenx_http_request_seconds",
            "Seconds until the response starts, by route template",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )


class RequestMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                # The router has put the matched route into the scope by now.
                route = getattr(scope.get("route"), "path", "unmatched")
                self.metrics.requests.labels(scope["method"], route, str(message["status"])).inc()
                self.metrics.seconds.labels(route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, send_counted)
