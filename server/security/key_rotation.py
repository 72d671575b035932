"""Rotating the encryption key: re-sealing what the previous keys sealed under the current one.

The procedure (README, "Key rotation"): start the server with the new key as VOXAUTH_KEY and
the old one in VOXAUTH_PREVIOUS_KEYS, run `voxauth reencrypt` (server/tools/reencrypt_cli.py;
with the server running or not: it works in small transactions), then remove the old key.
Until then both keys open the data, so there is no downtime.
"""

from __future__ import annotations

from datetime import datetime

from server.audit_actions import AuditAction
from server.storage.interface import AuditEvent, ReencryptionReport, Store

DEFAULT_BATCH_SIZE = 100
"""Rows per transaction: small enough that the server's writes wait only milliseconds."""


def reencrypt(
    store: Store, current_key_id: str, now: datetime, batch_size: int
) -> ReencryptionReport:
    """Re-seals every voiceprint and pending utterance under the current key and audits it
    ("key.reencrypt"). Blocking: call from a worker thread."""
    report = store.reencrypt_all(batch_size)
    store.append_audit(
        AuditEvent(
            AuditAction.KEY_REENCRYPT,
            "",
            "ok",
            now,
            {
                "key_id": current_key_id,
                "voiceprints": report.voiceprints,
                "pending_utterances": report.pending_utterances,
            },
        )
    )
    return report
