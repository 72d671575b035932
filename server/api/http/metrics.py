"""/metrics: the server's Prometheus metrics (server/api/metrics.py) in the text format."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.api.metrics import CONTENT_TYPE, Metrics

METRICS_PATH = "/metrics"


class MetricsRoutes:
    def __init__(
        self, metrics: Metrics, run_blocking: Callable[[Callable[[], bytes]], Awaitable[bytes]]
    ) -> None:
        """`run_blocking` runs the exposition off the event loop: its live figures read the
        store (the server's store pool)."""
        self._metrics = metrics
        self._run_blocking = run_blocking

    def routes(self) -> Sequence[BaseRoute]:
        return [Route(METRICS_PATH, self._scrape, methods=["GET"])]

    async def _scrape(self, request: Request) -> Response:
        body = await self._run_blocking(self._metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)
