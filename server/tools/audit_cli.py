"""`voxauth audit verify` and `voxauth audit export`: the operator's view of the audit chain,
read straight from the SQLite file (the server may be running).

Both need the service key (VOXAUTH_KEY or VOXAUTH_KEY_FILE, plus VOXAUTH_PREVIOUS_KEYS(_FILE)
after a key rotation): it checks the seals and opens the database as the server does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

from server.config import KeySettings, ServerConfig
from server.errors import ConfigurationError, StorageError
from server.security.audit import (
    AuditKey,
    AuditLog,
    AuditRecord,
    BreakKind,
    cef_lines,
    jsonl_lines,
    read_chain,
    verify_log,
)
from server.security.crypto import VoiceprintCipher, load_key, load_previous_keys
from server.storage.databases import open_store, store_exists

EXIT_INTACT = 0
EXIT_BROKEN = 1
EXIT_USAGE = 2


def main(argv: Sequence[str]) -> int:
    """Exit 0: verify found the chain intact, or export wrote it; 1: verify found a break;
    2: usage, configuration or storage problem."""
    args = _parser().parse_args(argv)
    try:
        database = args.db or ServerConfig.from_environment().database_path
        if not store_exists(database):
            # Opening would create an empty database and report it intact.
            raise ConfigurationError(f"no database at {database}")
        keys = KeySettings.from_environment()
        key = load_key(key_b64=keys.key, key_file=keys.key_file)
        previous = load_previous_keys(listed=keys.previous_keys, key_file=keys.previous_keys_file)
        store = open_store(database, VoiceprintCipher(key, previous), audit_key=AuditKey(key))
        try:
            if args.action == "verify":
                return _verify(store, [AuditKey(known) for known in (key, *previous)])
            return _export(store, args)
        finally:
            store.close()
    except (ConfigurationError, StorageError) as error:
        print(f"voxauth audit: {error.message}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voxauth audit", description="Check or export the tamper-evident audit log."
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the hash chain and its seals; exit 1 naming the first bad record"
    )
    export = actions.add_parser("export", help="write the records for a SIEM")
    for action in (verify, export):
        action.add_argument(
            "--db", help="SQLite file or postgresql:// URI (default var/voxauth.db, VOXAUTH_DB)"
        )
    export.add_argument("--format", choices=("jsonl", "cef"), default="jsonl")
    export.add_argument(
        "--since",
        type=_moment,
        help="only records at or after this ISO 8601 time (UTC unless it gives an offset)",
    )
    export.add_argument("--out", type=Path, help="file to write (created 0600; default stdout)")
    return parser


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _verify(log: AuditLog, keys: list[AuditKey]) -> int:
    report = verify_log(log, keys)
    if report.first_break is None:
        print(f"{report.records} records, chain intact")
        return EXIT_INTACT
    fault = report.first_break
    if fault.kind is BreakKind.REATTRIBUTED:
        print(
            f"audit attribution broken ({fault.kind.value}): {fault.reason}; the "
            f"{report.records} records are intact, but not who they are about"
        )
    else:
        print(
            f"audit chain broken at record {fault.seq} ({fault.kind.value}): {fault.reason}; "
            f"{report.records} records before it are intact"
        )
    return EXIT_BROKEN


def _export(log: AuditLog, args: argparse.Namespace) -> int:
    records: Iterator[AuditRecord] = read_chain(log)
    if args.since is not None:
        since: datetime = args.since
        records = (record for record in records if record.entry.time >= since)
    lines = cef_lines(records, version("voxauth")) if args.format == "cef" else jsonl_lines(records)
    if args.out is None:
        _write(lines, sys.stdout)
        return EXIT_INTACT
    try:
        # The export names agents and what they did: as private as the database.
        descriptor = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {args.out}: {exc.strerror}") from exc
    with os.fdopen(descriptor, "w", encoding="utf-8") as out:
        _write(lines, out)
    return EXIT_INTACT


def _write(lines: Iterator[str], out: TextIO) -> None:
    for line in lines:
        out.write(line + "\n")
