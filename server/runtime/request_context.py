"""The request id of the call in progress, carried through it by a context variable so every
log line the call writes names it (server/runtime/log_format.py), on the event loop and on the
worker threads the call's work runs on (the pools copy the caller's context).

A client may name its request (gRPC metadata `x-request-id`, an HTTP `X-Request-Id` header, or
a mutating call's `request_id` field) so its logs and ours meet; an id that is not 1-128
characters of [A-Za-z0-9._:-] is not taken (it would be untrusted text in every line) and a
fresh one is made instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import secrets
from collections.abc import Iterator

REQUEST_ID_HEADER = "x-request-id"
_ACCEPTABLE = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "voxauth_request_id", default=None
)


def new_request_id() -> str:
    """A fresh id: 96 random bits, hex."""
    return secrets.token_hex(12)


def acceptable_request_id(*candidates: str | None) -> str:
    """The first of `candidates` that is a well-formed request id, else a fresh one."""
    for candidate in candidates:
        if candidate and _ACCEPTABLE.fullmatch(candidate):
            return candidate
    return new_request_id()


def current_request_id() -> str | None:
    """The id of the request this code runs for; None outside any request."""
    return _request_id.get()


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Code inside runs (and logs) as part of request `request_id`."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        # ValueError: a streaming call's generator closed from another context (asyncio
        # finalising it after its task ended); the value went with the context it was set in.
        with contextlib.suppress(ValueError):
            _request_id.reset(token)
