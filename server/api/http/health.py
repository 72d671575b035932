"""/healthz and /readyz for orchestrators and balancers.

/healthz: the process answers (a liveness probe; restarting a server that is loading its
model would not help it). /readyz: new calls should come here — the same readiness as the
gRPC health service (server/api/readiness.py): 503 while the model loads and while draining.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

from server.api.readiness import Readiness


class HealthRoutes:
    def __init__(self, readiness: Readiness) -> None:
        self._readiness = readiness

    def routes(self) -> Sequence[BaseRoute]:
        return [
            Route("/healthz", self._live, methods=["GET"]),
            Route("/readyz", self._ready, methods=["GET"]),
        ]

    async def _live(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def _ready(self, request: Request) -> Response:
        if self._readiness.is_ready():
            return PlainTextResponse("ready\n")
        return PlainTextResponse("not ready: starting or stopping\n", status_code=503)
