"""Prometheus metrics and the structured access log, as one ASGI middleware."""
from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

access_log = logging.getLogger("trident_gateway.access")


class Metrics:
    """The gateway's metrics, in their own registry (one per app: tests run several apps in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("trident_gateway_requests_total", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("trident_gateway_request_duration_seconds", "Time to answer a request",
                                 ["route", "method", "status"], registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.in_flight = Gauge("trident_gateway_requests_in_flight", "Requests being answered",
                               registry=self.registry)


class Observe:
    """ASGI middleware: counts, times and logs every HTTP request."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500  # an exception escaping the app is answered 500 outside

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - start
            # the route template, not the path: unknown paths must not grow the label set
            route = getattr(scope.get("route"), "path", "<unmatched>")
            labels = (route, scope["method"], str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(elapsed)
            client = scope.get("client")
            access_log.info(json.dumps({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "method": scope["method"], "path": scope["path"], "status": status,
                "duration_ms": round(elapsed * 1000, 2),
                "key": scope.get("state", {}).get("key_name"),  # the key's name, never the key
                "client": f"{client[0]}:{client[1]}" if client else None}))
