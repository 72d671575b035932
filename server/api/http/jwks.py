"""The JWKS document, for MFA providers that fetch voxauth's verification keys by URL
(`GET /.well-known/jwks.json`). Public data only, so no authentication."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from server.security.assurances import JwksDocument

JWKS_PATH = "/.well-known/jwks.json"


class JwksRoutes:
    def __init__(
        self, jwks: Callable[[], JwksDocument], *, cache_max_age_seconds: int = 300
    ) -> None:
        """`jwks` is called per request, so a rotation shows at once. `cache_max_age_seconds`
        bounds how long a provider keeps a copy: a new key is unknown to it for up to that
        long unless it refetches on an unknown kid."""
        self._jwks = jwks
        self._cache_max_age = cache_max_age_seconds

    def routes(self) -> Sequence[BaseRoute]:
        # HEAD is answered by Starlette for every GET route.
        return [Route(JWKS_PATH, self._document, methods=["GET"])]

    async def _document(self, request: Request) -> Response:
        body = json.dumps(self._jwks(), separators=(",", ":"), sort_keys=True)
        return Response(
            body,
            media_type="application/json",
            headers={"Cache-Control": f"public, max-age={self._cache_max_age}"},
        )
