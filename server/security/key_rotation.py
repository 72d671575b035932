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

from server.audit_actions import AuditAction
from server.security.audit import AuditKey
from server.storage.interface import AuditEvent, ReencryptionReport, Store

DEFAULT_BATCH_SIZE = 100
"""Keys per transaction: small enough that the server's writes wait only milliseconds."""


def reencrypt(
    store: Store, current_key_id: str, now: datetime, batch_size: int
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
    store: Store,
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
