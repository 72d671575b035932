"""`voxauth reencrypt`: the key rotation's re-wrapping step (the procedure is in
server/security/key_rotation.py and the README, "Key rotation"), run against the SQLite file
while the server keeps running."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from server.config import KeySettings, ServerConfig
from server.errors import ConfigurationError, StorageError
from server.runtime.clock import SystemClock
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher, load_key, load_previous_keys
from server.security.key_rotation import DEFAULT_BATCH_SIZE, rotate
from server.storage.databases import open_store


def main(argv: Sequence[str]) -> int:
    """`voxauth reencrypt [--db PATH] [--batch-size N]`. Exit 0 once nothing sealed under a
    previous key remains, 1 if something does, 2 on a configuration or storage problem."""
    parser = argparse.ArgumentParser(
        prog="voxauth reencrypt",
        description="Re-wrap every data key (and re-seal the audit chain) under VOXAUTH_KEY; "
        "the keys they were sealed with must be in VOXAUTH_PREVIOUS_KEYS(_FILE).",
    )
    parser.add_argument(
        "--db", help="SQLite file or postgresql:// URI (default var/voxauth.db, VOXAUTH_DB)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="keys per transaction"
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
        store = open_store(database, cipher, audit_key=AuditKey(key))
        try:
            report, remaining = rotate(
                store,
                cipher.key_id,
                [AuditKey(k) for k in previous],
                SystemClock().now(),
                args.batch_size,
            )
        finally:
            store.close()
    except (ConfigurationError, StorageError) as error:
        print(f"voxauth reencrypt: {error.message}", file=sys.stderr)
        return 2
    print(f"re-wrapped under key {cipher.key_id}: {report.data_keys} data keys")
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
