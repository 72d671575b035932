"""Retries that are safe: a mutating RPC may carry a request id, and a retry with the same id
returns the first call's response instead of acting twice.

A client that lost a response (the server died after its commit, the connection dropped)
cannot tell whether the action happened; with a request id it simply sends the same request
again. The completion of a request is kept, keyed by (caller, method, request id), with a
digest of the request and the serialized response, for a bounded time
(VOXAUTH_REQUEST_ID_RETENTION_HOURS). Where the action is one unit of work the completion is
recorded in that unit (`Receipt`), so the action and its record commit together or not at all;
elsewhere it is recorded right after the action.

- The same id with a different request is refused (RequestIdReusedError).
- Only successes are kept: a call that failed acts again when retried.
- Two calls with the same key at once: the first acts, the second waits for it and then gets
  its response (or acts itself if the first failed). This serialisation is per process, which
  is the deployment the embedded store allows.

The store is reached through the protocols below (CompletedRequestStore, RequestRecorder),
which server/storage implements, so this module does not import server.storage.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from server.errors import InvalidRequestError, RequestIdReusedError
from server.runtime.clock import Clock
from server.runtime.store_pool import StorePool

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PURGE_INTERVAL_SECONDS = 3600.0


@dataclass(frozen=True)
class RequestKey:
    """Whose request, to which method, under which id: ids of different callers or methods
    never meet."""

    caller: str
    method: str
    request_id: str


@dataclass(frozen=True)
class CompletedRequest:
    key: RequestKey
    request_digest: bytes
    """SHA-256 of the request without its id: what tells a retry from a reuse of the id."""
    response: bytes
    """The serialized response the first call returned."""
    agent_id: str
    """The agent the response names, under whose data key it is sealed; "" for none."""
    expires_at: datetime


@dataclass(frozen=True)
class RecordedResponse:
    same_request: bool
    """Whether the recorded request had the digest asked about."""
    response: bytes


class RequestRecorder(Protocol):
    """What a unit of work offers to record a completion in its own transaction."""

    def record_request(self, completed: CompletedRequest) -> None:
        """Keeps the completion until it expires, replacing an expired one of the key. Keeps
        nothing when the agent it names does not exist (any more)."""


class CompletedRequestStore(Protocol):
    def recorded_response(
        self, key: RequestKey, request_digest: bytes, at: datetime
    ) -> RecordedResponse | None:
        """The completion of `key` unexpired at `at`, if any."""

    def record_request(self, completed: CompletedRequest) -> None:
        """RequestRecorder.record_request in a unit of its own."""

    def forget_expired_requests(self, at: datetime) -> int:
        """Removes the completions expired at `at`; how many."""


def request_key(caller: str, method: str, request_id: str) -> RequestKey | None:
    """The key of a request; None when it carries no id (it is not deduplicated). Raises
    InvalidRequestError for an id that is not 1-128 characters of [A-Za-z0-9._:-]."""
    if not request_id:
        return None
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequestError(
            "request_id must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-' "
            "(e.g. a UUID)",
            field="request_id",
        )
    return RequestKey(caller, method, request_id)


class Receipt:
    """Records one request's completion in the unit of work of its action."""

    def __init__(self, key: RequestKey, request_digest: bytes, expires_at: datetime) -> None:
        self._key = key
        self._digest = request_digest
        self._expires_at = expires_at
        self.recorded = False

    def record(self, unit: RequestRecorder, response: bytes, agent_id: str) -> None:
        unit.record_request(self.completion(response, agent_id))
        self.recorded = True

    def completion(self, response: bytes, agent_id: str) -> CompletedRequest:
        return CompletedRequest(self._key, self._digest, response, agent_id, self._expires_at)


@dataclass(frozen=True)
class Response:
    """What an action answered: the serialized response and the agent it names ("" none)."""

    payload: bytes
    agent_id: str


class RequestLedger:
    """Runs mutating requests at most once per request id. Used on the event loop."""

    def __init__(
        self,
        store: CompletedRequestStore,
        store_pool: StorePool,
        retention: timedelta,
        clock: Clock,
    ) -> None:
        self._store = store
        self._store_pool = store_pool
        self._retention = retention
        self._clock = clock
        self._locks: dict[RequestKey, asyncio.Lock] = {}
        self._users: dict[RequestKey, int] = {}
        self._next_purge = clock.monotonic()

    async def run(
        self,
        key: RequestKey | None,
        request_digest: bytes,
        act: Callable[[Receipt | None], Awaitable[Response]],
    ) -> bytes:
        """The serialized response of the request: the recorded one if `key` completed
        before with the same request, else what `act` answers. `act` gets a Receipt to
        record the completion in its unit of work (None when there is no key); if it does
        not use it, the completion is recorded after it returns. Raises
        RequestIdReusedError if the id completed before with another request."""
        if key is None:
            return (await act(None)).payload
        async with self._serialised(key):
            now = self._clock.now()
            recorded = await self._store_pool.run(
                lambda: self._store.recorded_response(key, request_digest, now)
            )
            if recorded is not None:
                if not recorded.same_request:
                    raise RequestIdReusedError(
                        f"request id {key.request_id!r} was used for a different "
                        f"{key.method} request; use a new id for a new request",
                        field="request_id",
                    )
                return recorded.response
            receipt = Receipt(key, request_digest, now + self._retention)
            response = await act(receipt)
            if not receipt.recorded:
                completion = receipt.completion(response.payload, response.agent_id)
                await self._store_pool.run(lambda: self._store.record_request(completion))
        if self._clock.monotonic() >= self._next_purge:
            # Expired completions are never answered; removing them now and then keeps the
            # table as small as the traffic of one retention period.
            self._next_purge = self._clock.monotonic() + _PURGE_INTERVAL_SECONDS
            await self.forget_expired()
        return response.payload

    async def forget_expired(self) -> int:
        """Removes the completions that have expired; how many."""
        now = self._clock.now()
        return await self._store_pool.run(lambda: self._store.forget_expired_requests(now))

    @asynccontextmanager
    async def _serialised(self, key: RequestKey) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
