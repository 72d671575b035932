"""What the MFA provider gets from voxauth: a signed assurance each time a shift's login check
passes, the public keys to verify it offline, and (through ShiftService) the shift events."""

from __future__ import annotations

import json
import logging

from server.errors import AssuranceNotFoundError
from server.runtime.clock import Clock
from server.security.assurances import AssuranceIssuer, JwksDocument, SigningKeyring, jwks_document
from server.storage.interface import AssuranceRecord, AssuranceStore, ShiftRecord

log = logging.getLogger(__name__)


class AssuranceDesk:
    """Issues, keeps and hands out assurances; publishes the keys. Blocking methods touch the
    store (and may rotate a due key): call them from a worker thread."""

    def __init__(
        self, store: AssuranceStore, keyring: SigningKeyring, audience: str, clock: Clock
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._issuer = AssuranceIssuer(keyring)
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
        record = self._store.get_assurance(shift_id)
        if record is None or record.expires_at <= self._clock.now():
            raise AssuranceNotFoundError(
                f"shift {shift_id} has no valid assurance: its login check has not passed, or "
                "the assurance expired"
            )
        return record

    def jwks_json(self) -> str:
        return json.dumps(jwks_document(self._keyring, self._clock.now()), sort_keys=True)

    def jwks(self) -> JwksDocument:
        return jwks_document(self._keyring, self._clock.now())

    def rotate(self) -> str:
        key = self._keyring.rotate(self._clock.now())
        log.info("assurance signing key rotated; new key id %s", key.kid)
        return key.kid
