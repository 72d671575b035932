"""Rotating the encryption key: re-wrapping under the current key the data keys the previous
keys wrapped (the data they seal is not touched), and re-sealing the audit chain.

The procedure (README, "Key rotation"): start the server with the new key as VOXAUTH_KEY and
the old one in VOXAUTH_PREVIOUS_KEYS, run `voxauth reencrypt` (server/tools/reencrypt_cli.py;
with the server running or not: it works in small transactions), then remove the old key.
Until then both keys open the data, so there is no downtime.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol

from server.audit_actions import AuditAction
from server.records import AuditEvent, ReencryptionReport
from server.security.audit import AuditKey


class KeyRotationStore(Protocol):
    """What rotating the encryption key needs of the store (server/storage implements it).
    Thread-safe."""

    def sealing_key_ids(self) -> dict[str, int]:
        """How many values (wrapped data keys, sealed signing keys) each service key id has
        sealed."""

    def reencrypt_all(self, batch_size: int) -> ReencryptionReport:
        """Wraps under the current service key every data key wrapped under a previous one,
        `batch_size` keys per transaction so the service keeps running. The data the keys
        seal is not touched."""

    def reseal_audit(self, keys: Sequence[AuditKey], batch_size: int) -> int:
        """Seals under the current audit key every audit record (and the head) sealed under
        one of `keys`, `batch_size` records per transaction; returns how many records. A
        seal that does not check out stops it with StorageError: re-sealing it would launder
        tampering. Raises ConfigurationError if the store has no audit key."""

    def append_audit(self, event: AuditEvent) -> None:
        """Appends one record to the audit log (the rotation's own)."""


DEFAULT_BATCH_SIZE = 100
"""Keys per transaction: small enough that the server's writes wait only milliseconds."""


def reencrypt(
    store: KeyRotationStore, current_key_id: str, now: datetime, batch_size: int
) -> ReencryptionReport:
    """Re-wraps every data key under the current key and audits it ("key.reencrypt").
    Blocking: call from a worker thread."""
    report = store.reencrypt_all(batch_size)
    store.append_audit(
        AuditEvent(
            AuditAction.KEY_REENCRYPT,
            "",
            "ok",
            now,
            {"key_id": current_key_id, "data_keys": report.data_keys},
        )
    )
    return report


def rotate(
    store: KeyRotationStore,
    current_key_id: str,
    previous_audit_keys: Sequence[AuditKey],
    now: datetime,
    batch_size: int,
) -> tuple[ReencryptionReport, dict[str, int]]:
    """`reencrypt`, then the audit chain's seals move to the current key too (only seals that
    check out). Returns the report and how many values are still sealed under each previous
    key (signing keys are re-sealed by the server when it starts with the new key)."""
    report = reencrypt(store, current_key_id, now, batch_size)
    store.reseal_audit(previous_audit_keys, batch_size)
    remaining = {
        key_id: count
        for key_id, count in store.sealing_key_ids().items()
        if key_id != current_key_id
    }
    return report, remaining
