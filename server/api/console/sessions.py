"""Console sessions: a bearer token from `voxauth token --role supervisor` (or admin) is
presented once and exchanged for a short-lived session, so the browser holds no long-lived
credential, and voxauth keeps no password store.

Sessions are server-side: the cookie holds only a random id (256 bits), looked up by its
SHA-256, so a stolen database or memory dump of ids is not a cookie; a restart signs everyone
out. Each session has its own CSRF token (synchronizer pattern): every state-changing request
must carry it, on top of the SameSite=Strict cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.security.identity import Identity

COOKIE = "__Host-voxauth-console"
"""The __Host- prefix makes the browser refuse it unless Secure, Path=/ and without Domain."""
SESSION_LIFETIME = timedelta(minutes=30)
MAX_SESSIONS = 1000


@dataclass(frozen=True)
class Session:
    identity: Identity
    csrf_token: str
    expires_at: datetime

    def csrf_matches(self, offered: str | None) -> bool:
        return offered is not None and hmac.compare_digest(
            offered.encode(), self.csrf_token.encode()
        )


class Sessions:
    def __init__(self, lifetime: timedelta = SESSION_LIFETIME) -> None:
        self._lifetime = lifetime
        self._by_digest: dict[str, Session] = {}

    def open(self, identity: Identity, now: datetime) -> tuple[str, Session]:
        """A new session; its id (for the cookie only) and the session."""
        self._drop_expired(now)
        if len(self._by_digest) >= MAX_SESSIONS:
            # The oldest go first: sign-ins cannot grow memory without bound.
            oldest = min(self._by_digest, key=lambda d: self._by_digest[d].expires_at)
            del self._by_digest[oldest]
        session_id = secrets.token_urlsafe(32)
        session = Session(identity, secrets.token_urlsafe(32), now + self._lifetime)
        self._by_digest[_digest(session_id)] = session
        return session_id, session

    def find(self, session_id: str | None, now: datetime) -> Session | None:
        if not session_id or len(session_id) > 128:
            return None
        session = self._by_digest.get(_digest(session_id))
        if session is None or session.expires_at <= now:
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._by_digest.pop(_digest(session_id), None)

    def _drop_expired(self, now: datetime) -> None:
        for digest in [d for d, s in self._by_digest.items() if s.expires_at <= now]:
            del self._by_digest[digest]


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()
