"""Rotating the encryption key: re-sealing what the previous keys sealed under the current one.

The procedure (README, "Key rotation"): start the server with the new key as VOXAUTH_KEY and
the old one in VOXAUTH_PREVIOUS_KEYS, run `voxauth reencrypt` (with the server running or
not: it works in small transactions), then remove the old key. Until then both keys open the
data, so there is no downtime.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from server.audit_actions import AuditAction
from server.config import KeySettings, ServerConfig
from server.errors import ConfigurationError, StorageError
from server.runtime.clock import SystemClock
from server.security.audit import AuditKey
from server.security.crypto import (
    VoiceprintCipher,
    load_key,
    load_previous_keys,
)
from server.storage.interface import AuditEvent, ReencryptionReport, Store
from server.storage.sqlite.store import SqliteVoiceprintStore

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


def main(argv: Sequence[str]) -> int:
    """`voxauth reencrypt [--db PATH] [--batch-size N]`. Exit 0 once nothing sealed under a
    previous key remains, 1 if something does, 2 on a configuration or storage problem."""
    parser = argparse.ArgumentParser(
        prog="voxauth reencrypt",
        description="Re-seal every voiceprint and pending utterance under VOXAUTH_KEY; the "
        "keys they were sealed with must be in VOXAUTH_PREVIOUS_KEYS(_FILE).",
    )
    parser.add_argument("--db", type=Path, help="SQLite file (default var/voxauth.db, VOXAUTH_DB)")
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="rows per transaction"
    )
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        database = args.db or ServerConfig.from_environment().database_path
        keys = KeySettings.from_environment()
        key = load_key(key_b64=keys.key, key_file=keys.key_file)
        previous = load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)
        cipher = VoiceprintCipher(key, previous)
        store = SqliteVoiceprintStore.open(database, cipher, audit_key=AuditKey(key))
        try:
            report = reencrypt(store, cipher.key_id, SystemClock().now(), args.batch_size)
            # The audit chain's seals move to the new key too (only seals that check out).
            store.reseal_audit([AuditKey(k) for k in previous], args.batch_size)
            remaining = {
                key_id: count
                for key_id, count in store.sealing_key_ids().items()
                if key_id != cipher.key_id
            }
        finally:
            store.close()
    except (ConfigurationError, StorageError) as error:
        print(f"voxauth reencrypt: {error.message}", file=sys.stderr)
        return 2
    print(
        f"re-sealed under key {cipher.key_id}: {report.voiceprints} voiceprints, "
        f"{report.pending_utterances} pending utterances"
    )
    if remaining:
        listed = ", ".join(f"{key_id} ({count} values)" for key_id, count in remaining.items())
        # Signing keys are re-sealed by the server when it starts with the new key.
        print(
            f"still sealed under a previous key: {listed}; keep the previous keys until a "
            "server started with the new key has re-sealed them, then run this again"
        )
        return 1
    print("nothing is sealed under a previous key any more: the previous keys can be removed")
    return 0
