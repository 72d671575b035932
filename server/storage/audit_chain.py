"""The write side of the tamper-evident audit log (server/security/audit.py), above the
backend: each record is hashed onto the chain and sealed, the sealed head moves with it, an
existing agent is named by its pseudonym only, and details that could hold biometric data are
refused. Every function works inside a backend transaction, so a record commits with
whatever else that transaction writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from server.audit_actions import AuditAction
from server.errors import StorageError
from server.records import AuditEvent
from server.security.audit import (
    GENESIS_HASH,
    AuditEntry,
    AuditHead,
    AuditKey,
    AuditRecord,
    canonical_details,
    chain_hash,
    new_agent_pseudonym,
)
from server.storage.backend import AuditRow, Transaction
from server.storage.sealing import to_micros

# A longer list of floats in audit details looks like an embedding written out with tolist().
_MAX_AUDIT_FLOATS = 32


def append(txn: Transaction, key: AuditKey | None, event: AuditEvent, agent_ref: str) -> None:
    """Chains and seals the record after the sealed head and moves the head on. `agent_ref`:
    the pseudonym of the agent the record is about while it exists, which the record carries
    instead of its id; empty for an id that is no agent (any more), as in the record of an
    erasure, recorded in clear. Raises ValueError for details that are not plain JSON or could
    hold biometric data."""
    _refuse_biometrics(event.details, "details")
    details = canonical_details(event.details)
    entry = AuditEntry(
        to_micros(event.at),
        event.action,
        "" if agent_ref else event.agent_id,
        agent_ref,
        event.outcome,
        details,
    )
    head = txn.audit_head()
    if head is None:
        raise StorageError(
            "the audit chain's head is missing: the audit log was tampered with (run "
            "`voxauth audit verify`)"
        )
    # Continuing from the head rather than from the last row keeps records cut off the end
    # missing for good: the next record cannot seal over the cut.
    seq, record_hash = head.seq + 1, chain_hash(head.hash, entry)
    txn.insert_audit_row(
        AuditRow(seq, entry, head.hash, record_hash, *_record_seal(key, record_hash))
    )
    _seal_head(txn, key, seq, record_hash)


def records(rows: Sequence[AuditRow], agents: Mapping[str, str]) -> list[AuditRecord]:
    """The rows with who each is about as far as is known now: the agent whose pseudonym the
    row carries while that agent exists (`agents`: agent id by pseudonym), else the id the row
    names in clear (if any)."""
    return [
        AuditRecord(
            seq=row.seq,
            entry=row.entry,
            prev_hash=row.prev_hash,
            hash=row.hash,
            key_id=row.key_id,
            mac=row.mac,
            agent=agents.get(row.entry.agent_ref, row.entry.agent_id),
        )
        for row in rows
    ]


def event(record: AuditRecord) -> AuditEvent:
    entry = record.entry
    return AuditEvent(
        entry.action, record.agent, entry.outcome, entry.time, json.loads(entry.details)
    )


def about(rows: Iterable[AuditRow], agent_id: str, pseudonym: str | None) -> list[AuditRow]:
    """The rows about the agent: those under its pseudonym (while it exists) and those naming
    its id in clear."""
    return [
        row
        for row in rows
        if (pseudonym is not None and row.entry.agent_ref == pseudonym)
        or (row.entry.agent_ref == "" and row.entry.agent_id == agent_id)
    ]


def all_rows(txn: Transaction, page_size: int = 1000) -> list[AuditRow]:
    """Every row of the chain, by seq."""
    rows: list[AuditRow] = []
    while page := txn.audit_rows(rows[-1].seq if rows else 0, page_size):
        rows += page
    return rows


def reseal_page(
    txn: Transaction, current: AuditKey, known: Mapping[str, AuditKey], batch_size: int
) -> int:
    """Seals under `current` up to `batch_size` records sealed under one of the `known` keys,
    and the head once no record is left; returns how many records. A seal that does not check
    out raises StorageError: re-sealing it would launder tampering."""
    rows = txn.audit_rows_sealed_by_other_keys(current.key_id, batch_size)
    for row in rows:
        key = known.get(row.key_id or "")
        if key is None or row.mac is None or not key.sealed_record(row.hash, row.mac):
            raise StorageError(
                f"audit record {row.seq}'s seal does not check out under the given keys; run "
                "`voxauth audit verify` before re-sealing"
            )
        txn.update_audit_row(
            AuditRow(row.seq, row.entry, row.prev_hash, row.hash, *_record_seal(current, row.hash))
        )
    if not rows:
        _reseal_head(txn, current, known)
    return len(rows)


def chain_carried_over(
    txn: Transaction, key: AuditKey | None, pseudonyms: Mapping[str, str]
) -> None:
    """Pseudonymises, chains and seals the audit rows a database from before the chain carries
    over (its migration leaves them unhashed), in the migration's transaction; `pseudonyms`:
    each existing agent's, by id. The rows of an agent erased back then lose its id (a
    pseudonym nothing resolves) except the record of the erasure, as they would have had the
    chain existed."""
    rows = all_rows(txn)
    # An id erased and created again: its rows up to the last erasure are the erased agent's.
    last_erasure = {
        row.entry.agent_id: row.seq for row in rows if row.entry.action == AuditAction.AGENT_DELETE
    }
    erased: dict[str, str] = {}
    seq, prev_hash = 0, GENESIS_HASH
    for row in rows:
        seq, carried = row.seq, row.entry
        agent_id = carried.agent_id
        if not agent_id or carried.action == AuditAction.AGENT_DELETE:
            agent_ref = ""
        elif agent_id in pseudonyms and seq > last_erasure.get(agent_id, 0):
            agent_ref = pseudonyms[agent_id]
        else:
            agent_ref = erased.setdefault(agent_id, new_agent_pseudonym())
        entry = AuditEntry(
            carried.at,
            carried.action,
            "" if agent_ref else agent_id,
            agent_ref,
            carried.outcome,
            canonical_details(json.loads(carried.details)),
        )
        record_hash = chain_hash(prev_hash, entry)
        txn.update_audit_row(
            AuditRow(seq, entry, prev_hash, record_hash, *_record_seal(key, record_hash))
        )
        prev_hash = record_hash
    _seal_head(txn, key, seq, prev_hash)


def _record_seal(key: AuditKey | None, record_hash: str) -> tuple[str | None, str | None]:
    """The key id and MAC of a record."""
    return (None, None) if key is None else (key.key_id, key.record_mac(record_hash))


def _seal_head(txn: Transaction, key: AuditKey | None, seq: int, head_hash: str) -> None:
    txn.put_audit_head(
        AuditHead(
            seq,
            head_hash,
            None if key is None else key.key_id,
            None if key is None else key.head_mac(seq, head_hash),
        )
    )


def _reseal_head(txn: Transaction, current: AuditKey, known: Mapping[str, AuditKey]) -> None:
    head = txn.audit_head()
    if head is None or head.key_id == current.key_id:
        return
    key = known.get(head.key_id or "")
    if key is None or head.mac is None or not key.sealed_head(head.seq, head.hash, head.mac):
        raise StorageError(
            "the audit chain head's seal does not check out under the given keys; run "
            "`voxauth audit verify` before re-sealing"
        )
    _seal_head(txn, current, head.seq, head.hash)


def _refuse_biometrics(value: object, where: str) -> None:
    """Raises ValueError if audit details hold anything that could be an embedding."""
    if isinstance(value, bytes | bytearray | memoryview | np.ndarray):
        raise ValueError(
            f"audit {where} is {type(value).__name__}: the audit log never holds embeddings "
            "or binary data"
        )
    if isinstance(value, Mapping):
        for name, item in value.items():
            _refuse_biometrics(item, f"{where}.{name}")
    elif isinstance(value, list | tuple):
        if sum(isinstance(item, float) for item in value) > _MAX_AUDIT_FLOATS:
            raise ValueError(
                f"audit {where} holds more than {_MAX_AUDIT_FLOATS} numbers, which looks like "
                "an embedding; the audit log never holds embeddings"
            )
        for index, item in enumerate(value):
            _refuse_biometrics(item, f"{where}[{index}]")
