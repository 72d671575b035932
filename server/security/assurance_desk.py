"""What the MFA provider gets from voxauth: a signed assurance each time a shift's login check
passes, the public keys to verify it offline, whether a token still stands (introspection),
and (through ShiftService) the shift events."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.errors import AssuranceNotFoundError, AssuranceRevokedError
from server.records import AssuranceRecord, AssuranceRevocation, RevocationReason, ShiftRecord
from server.runtime.clock import Clock
from server.security.assurances import (
    AssuranceClaims,
    AssuranceIssuer,
    AssuranceVerifier,
    InactiveReason,
    JwksDocument,
    SigningKeyring,
    SigningKeyStore,
    jwks_document,
)
from server.validation import validate_shift_id

log = logging.getLogger(__name__)

_REVOKED_BECAUSE = {
    RevocationReason.SHIFT_ENDED: InactiveReason.REVOKED_SHIFT_ENDED,
    RevocationReason.SHIFT_LOCKED: InactiveReason.REVOKED_SHIFT_LOCKED,
}


class AssuranceStore(SigningKeyStore, Protocol):
    """Signing keys (sealed), the assurances issued with them and their revocations: what the
    desk needs of the store (server/storage implements it). Thread-safe."""

    def save_assurance(self, assurance: AssuranceRecord) -> None:
        """Keeps `assurance` as its shift's latest, replacing an earlier one (whose revocation,
        if any, stands)."""

    def get_assurance(self, shift_id: str) -> AssuranceRecord | None: ...

    def revoke_assurance(
        self, shift_id: str, reason: RevocationReason, at: datetime
    ) -> AssuranceRevocation | None:
        """Revokes the shift's latest assurance in one atomic step and returns the revocation;
        None when the shift has no assurance or its latest is revoked already (the first
        revocation stands)."""

    def get_revocation(self, token_id: str) -> AssuranceRevocation | None:
        """The revocation of the assurance whose jti is `token_id`; None if it has none."""


@dataclass(frozen=True)
class Introspection:
    """Whether a token stands now (RFC 7662's `active`): its claims when it does, why not
    when it does not."""

    claims: AssuranceClaims | None
    inactive_reason: InactiveReason | None = None
    revocation: AssuranceRevocation | None = None
    """For a revoked token: when and why."""

    @property
    def active(self) -> bool:
        return self.inactive_reason is None


class AssuranceDesk:
    """Issues, keeps, revokes and hands out assurances; publishes the keys. Blocking methods
    touch the store (and may rotate a due key): call them from a worker thread."""

    def __init__(
        self, store: AssuranceStore, keyring: SigningKeyring, audience: str, clock: Clock
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._issuer = AssuranceIssuer(keyring)
        self._verifier = AssuranceVerifier(keyring)
        self._audience = audience
        self._clock = clock

    def issue(self, shift: ShiftRecord) -> AssuranceRecord:
        """Signs an assurance that the shift's login check has just passed, and keeps it."""
        now = self._clock.now()
        signed = self._issuer.issue(
            agent_id=shift.agent_id,
            shift_id=shift.shift_id,
            device_id=shift.device_id,
            audience=self._audience,
            now=now,
        )
        record = AssuranceRecord(
            shift_id=shift.shift_id,
            agent_id=shift.agent_id,
            token_id=signed.jti,
            token=signed.token,
            issued_at=now,
            expires_at=signed.expires_at,
        )
        self._store.save_assurance(record)
        return record

    def latest(self, shift_id: str) -> AssuranceRecord:
        """Raises InvalidRequestError, AssuranceNotFoundError, AssuranceRevokedError."""
        shift_id = validate_shift_id(shift_id)
        record = self._store.get_assurance(shift_id)
        if record is None or record.expires_at <= self._clock.now():
            raise AssuranceNotFoundError(
                f"shift {shift_id} has no valid assurance: its login check has not passed, or "
                "the assurance expired"
            )
        revocation = self._store.get_revocation(record.token_id)
        if revocation is not None:
            raise AssuranceRevokedError(
                f"the assurance of shift {shift_id} was revoked: {revocation.reason.value}"
            )
        return record

    def revoke(self, shift_id: str, reason: RevocationReason) -> AssuranceRevocation | None:
        """Revokes the shift's latest assurance; None when it has none or it is revoked
        already."""
        return self._store.revoke_assurance(shift_id, reason, self._clock.now())

    def introspect(self, token: str) -> Introspection:
        """Whether `token` is an assurance of this service that stands now: signed with a
        published key, under this issuer, within its validity period, not revoked, and its
        shift still on record."""
        verified = self._verifier.verify(token, self._clock.now())
        if isinstance(verified, InactiveReason):
            return Introspection(None, verified)
        revocation = self._store.get_revocation(verified.token_id)
        if revocation is not None:
            return Introspection(None, _REVOKED_BECAUSE[revocation.reason], revocation)
        if self._store.get_assurance(verified.shift_id) is None:
            # Signed here, so once kept: only erasing the agent takes its shifts away.
            return Introspection(None, InactiveReason.SHIFT_ERASED)
        return Introspection(verified)

    def jwks_json(self) -> str:
        return json.dumps(jwks_document(self._keyring, self._clock.now()), sort_keys=True)

    def jwks(self) -> JwksDocument:
        return jwks_document(self._keyring, self._clock.now())

    def rotate(self) -> str:
        key = self._keyring.rotate(self._clock.now())
        log.info("assurance signing key rotated; new key id %s", key.kid)
        return key.kid
