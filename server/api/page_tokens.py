"""Opaque page tokens for listings: where the next page starts, sealed so the caller can
neither read it (it holds an agent id) nor forge or alter one.

Each token is AES-256-GCM under a key derived from the service key (so a listing paged on
one replica continues on another behind a load balancer), with the caller's name and the
listing's filters as associated data: a token altered, made up, taken to another caller or
replayed with other filters fails to open and is refused (INVALID_ARGUMENT). It also expires
(TOKEN_LIFETIME). A token only says
where to resume; the role check runs on every call whatever it holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from server.errors import InvalidRequestError

TOKEN_LIFETIME = timedelta(hours=1)
_NONCE_BYTES = 12
# A token is one agent id (at most 128 characters) and a time: anything much longer is not one.
_MAX_TOKEN_CHARS = 1024


class PageTokens:
    def __init__(self, key: bytes | None = None) -> None:
        self._aead = AESGCM(key if key is not None else AESGCM.generate_key(bit_length=256))

    def issue(self, position: str, *, caller: str, scope: str, now: datetime) -> str:
        """A token for resuming after `position`, for `caller` and a listing of `scope` (the
        filters, as a canonical string)."""
        nonce = os.urandom(_NONCE_BYTES)
        plain = json.dumps({"after": position, "at": now.timestamp()}).encode()
        sealed = self._aead.encrypt(nonce, plain, _bound(caller, scope))
        return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")

    def open(self, token: str, *, caller: str, scope: str, now: datetime) -> str:
        """The position `token` holds. Raises InvalidRequestError for anything this server
        did not issue for this caller and scope, or that has expired."""
        refused = InvalidRequestError(
            "page_token is not one this server issued for this caller and these filters "
            "(tokens expire after an hour): start from the first page",
            field="page_token",
        )
        if len(token) > _MAX_TOKEN_CHARS:
            raise refused
        try:
            blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            plain = self._aead.decrypt(
                blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], _bound(caller, scope)
            )
            fields = json.loads(plain)
            position, issued = str(fields["after"]), float(fields["at"])
        except (binascii.Error, ValueError, InvalidTag, KeyError, TypeError):
            raise refused from None
        if not 0 <= now.timestamp() - issued <= TOKEN_LIFETIME.total_seconds():
            raise refused
        return position


def _bound(caller: str, scope: str) -> bytes:
    return hashlib.sha256(json.dumps([caller, scope]).encode()).digest()
