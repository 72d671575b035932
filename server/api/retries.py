"""Safe retries at the gRPC edge: a mutating call's request id, caller and digest go to the
RequestLedger (server/runtime/requests.py), and its response travels as bytes, so a retry gets
exactly the message the first call answered.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from server.runtime.requests import Receipt, RequestLedger, Response, request_key
from server.security.identity import caller_identity
from server.storage.interface import UnitOfWork

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class RequestDigest:
    """SHA-256 of a request without its request_id, over one message or a stream's messages.
    Reads bytes fields in place, so a large upload is hashed without another copy of it."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()

    @classmethod
    def of(cls, request: Message) -> bytes:
        return cls().add(request).digest()

    def add(self, message: Message) -> RequestDigest:
        self._hash.update(b"\x00message")
        self._feed(message, top=True)
        return self

    def digest(self) -> bytes:
        return self._hash.digest()

    def _feed(self, message: Message, *, top: bool) -> None:
        # ListFields gives the set fields by number: the same request hashes alike however it
        # was encoded on the wire.
        for field, value in message.ListFields():
            if top and field.name == "request_id":
                continue
            self._hash.update(field.number.to_bytes(4, "big"))
            values = value if field.is_repeated else [value]
            self._hash.update(len(values).to_bytes(8, "big"))
            for item in values:
                self._value(field, item)

    def _value(self, field: FieldDescriptor, value: Any) -> None:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            self._hash.update(b"{")
            self._feed(value, top=False)
            self._hash.update(b"}")
            return
        encoded = value if isinstance(value, bytes) else repr(value).encode()
        self._hash.update(len(encoded).to_bytes(8, "big"))
        self._hash.update(encoded)


async def once(
    ledger: RequestLedger,
    method: str,
    request_id: str,
    digest: bytes,
    response_type: type[M],
    act: Callable[[Receipt | None], Awaitable[tuple[M, str]]],
) -> M:
    """The response of the call: `act`'s, or the first call's when `request_id` was used
    before by this caller for `method` with the same request (its RequestDigest). `act`
    performs the call and answers its response and the id of the agent the response names
    ("" for none)."""
    key = request_key(caller_identity().name, method, request_id)

    async def run(receipt: Receipt | None) -> Response:
        response, agent_id = await act(receipt)
        return Response(response.SerializeToString(deterministic=True), agent_id)

    payload = await ledger.run(key, digest, run)
    return response_type.FromString(payload)


def in_unit(
    receipt: Receipt | None, message: Callable[[T], Message], agent_of: Callable[[T], str]
) -> Callable[[UnitOfWork, T], None] | None:
    """What a domain call runs in its unit of work with its outcome, so the completion of the
    request commits with the action: the response `message` makes of the outcome, sealed for
    the agent `agent_of` names."""
    if receipt is None:
        return None
    recording = receipt

    def record(unit: UnitOfWork, outcome: T) -> None:
        response = message(outcome).SerializeToString(deterministic=True)
        recording.record(unit, response, agent_of(outcome))

    return record
