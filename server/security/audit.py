"""The tamper-evident audit log: hash-chained records sealed with an HMAC key, the check that
finds the first edited, removed or reordered record, and exports for a SIEM.

Record n's hash is SHA-256 over record n-1's hash (64 hex characters; 64 zeros before the
first record) followed by the canonical JSON of record n's content (`AuditEntry.canonical`).
Editing a record breaks its own hash; removing or moving one breaks the link of the record
after it. Anyone with write access to the database could still rewrite the whole chain
consistently, so each record's hash and the chain's head (record count and last hash) are
also sealed with an HMAC under a subkey of the service key (VOXAUTH_KEY), which the database
file does not hold. The sealed head is what makes cutting records off the end detectable:
the chain alone cannot tell a shorter log from a truncated one.

What the chain cannot show: an old sealed head put back together with the log truncated to
match it. Exporting the log regularly to a SIEM anchors it outside the database.

Agents appear under a pseudonym (`agent_ref`), a random value sealed with the agent's identity
under the agent's own data key: while the agent exists the store resolves it, and erasing the
agent destroys the key and with it the only link. Because the pseudonym is sealed, swapping two
agents' pseudonyms or replacing one (which would re-attribute their records) breaks the seal,
and verification reports it. The record of the erasure itself names the agent in clear.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from server.errors import ConfigurationError

GENESIS_HASH = "0" * 64
"""What the first record links to."""


_KEY_BYTES = 32
_KEY_ID_BYTES = 8
# A subkey of its own keeps the audit seal apart from the voiceprint and signing-key domains.
_SUBKEY_PURPOSE = b"voxauth audit chain seal v1"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def canonical_details(details: Mapping[str, Any]) -> str:
    """The one text form of audit details that is stored and hashed: sorted keys, no
    whitespace, UTF-8 rather than escapes. Raises ValueError for values JSON cannot hold."""
    try:
        return json.dumps(
            details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details must be plain JSON values: {exc}") from exc


def new_agent_pseudonym() -> str:
    """A fresh agent pseudonym: 128 random bits, hex."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class AuditEntry:
    """What a record's hash covers: its content, as stored."""

    at: int
    """Microseconds since the Unix epoch, UTC."""
    action: str
    agent_id: str
    """The agent in clear: only in a record about an id that was no agent when it was written,
    chiefly the record of an erasure. Empty otherwise."""
    agent_ref: str
    """The pseudonym of the agent the record is about; empty when agent_id is set or the
    record is about no agent."""
    outcome: str
    details: str
    """The details as stored: `canonical_details` text."""

    @property
    def time(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self.at)

    def canonical(self) -> bytes:
        """Sorted keys, no whitespace, UTF-8; the details as a string, exactly as stored."""
        content = {
            "action": self.action,
            "agent_id": self.agent_id,
            "agent_ref": self.agent_ref,
            "at": self.at,
            "details": self.details,
            "outcome": self.outcome,
        }
        return json.dumps(
            content, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        ).encode()


def chain_hash(prev_hash: str, entry: AuditEntry) -> str:
    return hashlib.sha256(prev_hash.encode() + entry.canonical()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    """One record of the chain, as stored, and who it is about as far as is known now."""

    seq: int
    """Position in the chain, from 1. Not hashed: the links fix the order."""
    entry: AuditEntry
    prev_hash: str
    hash: str
    key_id: str | None
    """Id of the service key whose audit subkey sealed the record; None if unsealed."""
    mac: str | None
    agent: str
    """The agent the record is about: agent_id, or the agent whose pseudonym agent_ref is
    while that agent exists; empty otherwise (no agent, or an erased one). Not hashed."""


@dataclass(frozen=True)
class AuditHead:
    """The chain's sealed head: how many records it has and the last one's hash."""

    seq: int
    hash: str
    key_id: str | None
    mac: str | None


class AuditKey:
    """Seals record hashes and the chain head with HMAC-SHA256 under a subkey of the service
    key. Thread-safe (holds no mutable state)."""

    def __init__(self, service_key: bytes) -> None:
        if len(service_key) != _KEY_BYTES:
            raise ConfigurationError(
                f"the encryption key is {len(service_key)} bytes; it must be {_KEY_BYTES}"
            )
        self._subkey = HKDF(
            algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=_SUBKEY_PURPOSE
        ).derive(service_key)
        # The service key's id, as server/crypto.py shows it, so an operator sees one id.
        self.key_id = hashlib.sha256(service_key).digest()[:_KEY_ID_BYTES].hex()

    def record_mac(self, record_hash: str) -> str:
        return self._mac(b"record\0" + record_hash.encode())

    def head_mac(self, seq: int, head_hash: str) -> str:
        return self._mac(b"head\0" + str(seq).encode() + b"\0" + head_hash.encode())

    def sealed_record(self, record_hash: str, mac: str) -> bool:
        return hmac.compare_digest(self.record_mac(record_hash), mac)

    def sealed_head(self, seq: int, head_hash: str, mac: str) -> bool:
        return hmac.compare_digest(self.head_mac(seq, head_hash), mac)

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._subkey, message, hashlib.sha256).hexdigest()


# --- verification --------------------------------------------------------------------------


class BreakKind(enum.Enum):
    EDITED = "edited"
    """A record's content or number no longer matches what was written."""
    REMOVED = "removed"
    """A record is missing: from the middle (a link points to nothing) or the end."""
    REORDERED = "reordered"
    """A record is not where the chain puts it."""
    FORGED = "forged"
    """A seal does not match: the chain was rewritten without the audit key."""
    UNVERIFIABLE = "unverifiable"
    """A seal cannot be checked: missing, or made with a key that is not loaded."""
    REATTRIBUTED = "reattributed"
    """The records are intact, but who they are about is not: an agent's sealed pseudonym
    was swapped with another's, replaced or altered."""


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    """The first record at fault (for the head: the record count it claims; 0 when the
    records are intact but their attribution is not)."""
    kind: BreakKind
    reason: str


@dataclass(frozen=True)
class ChainReport:
    records: int
    """Records checked and found sound before the break (all of them if intact)."""
    first_break: ChainBreak | None

    @property
    def intact(self) -> bool:
        return self.first_break is None


class AuditLog(Protocol):
    """Where the chain is read from (the store)."""

    def audit_head(self) -> AuditHead | None:
        """The sealed head; None if it is missing."""

    def audit_records(self, after_seq: int, limit: int) -> list[AuditRecord]:
        """At most `limit` records with seq > after_seq, in seq order."""

    def attribution_faults(self) -> list[str]:
        """Why the pseudonyms in the records may not name the agents they seem to: one reason
        per agent whose sealed pseudonym does not check out. Empty when every one does."""


def read_chain(log: AuditLog, *, page_size: int = 1000) -> Iterator[AuditRecord]:
    """Every record, in order, one page per read so a long log never sits in memory."""
    after = 0
    while page := log.audit_records(after, page_size):
        yield from page
        after = page[-1].seq


def verify_log(log: AuditLog, keys: Iterable[AuditKey]) -> ChainReport:
    """Checks the whole chain, then who its records are about. The head is read first:
    records appended meanwhile come after it and are checked on their own seals."""
    head = log.audit_head()
    report = verify_chain(read_chain(log), head, keys)
    if report.first_break is not None:
        return report
    faults = log.attribution_faults()
    if faults:
        return ChainReport(report.records, ChainBreak(0, BreakKind.REATTRIBUTED, "; ".join(faults)))
    return report


def verify_chain(
    records: Iterable[AuditRecord], head: AuditHead | None, keys: Iterable[AuditKey]
) -> ChainReport:
    """The first break in the chain, if any. `keys`: the current audit key and those of
    previous service keys, for records sealed before a key rotation."""
    known = {key.key_id: key for key in keys}
    remaining = iter(records)
    checked = 0
    expected_prev = GENESIS_HASH
    hash_at_head = GENESIS_HASH if head is not None and head.seq == 0 else None
    for record in remaining:
        position = checked + 1
        fault = _record_fault(record, position, expected_prev, known, remaining)
        if fault is not None:
            return ChainReport(checked, fault)
        checked = position
        expected_prev = record.hash
        if head is not None and position == head.seq:
            hash_at_head = record.hash
    return ChainReport(checked, _head_fault(head, checked, hash_at_head, known))


def _record_fault(
    record: AuditRecord,
    position: int,
    expected_prev: str,
    known: Mapping[str, AuditKey],
    remaining: Iterator[AuditRecord],
) -> ChainBreak | None:
    if chain_hash(record.prev_hash, record.entry) != record.hash:
        return ChainBreak(
            record.seq, BreakKind.EDITED, f"record {record.seq} does not match its hash"
        )
    if record.prev_hash != expected_prev:
        # Which record is missing here shows only further on: if the one this record links
        # to comes later, records were moved; if it never comes, it was removed.
        if any(later.hash == record.prev_hash for later in remaining):
            return ChainBreak(
                position,
                BreakKind.REORDERED,
                f"record {record.seq} stands at position {position}, but the record it "
                "follows comes later",
            )
        return ChainBreak(
            position,
            BreakKind.REMOVED,
            f"record {position} is missing: record {record.seq} links to a record that is not "
            "in the log",
        )
    if record.seq != position:
        return ChainBreak(
            record.seq,
            BreakKind.EDITED,
            f"record {position} of the chain is numbered {record.seq}",
        )
    fault = _seal_fault(
        record.key_id, record.mac, known, lambda key, mac: key.sealed_record(record.hash, mac)
    )
    if fault is not None:
        kind, what = fault
        return ChainBreak(record.seq, kind, f"record {record.seq} {what}")
    return None


def _head_fault(
    head: AuditHead | None, records: int, hash_at_head: str | None, known: Mapping[str, AuditKey]
) -> ChainBreak | None:
    if head is None:
        return ChainBreak(records, BreakKind.REMOVED, "the chain's sealed head is missing")
    fault = _seal_fault(
        head.key_id, head.mac, known, lambda key, mac: key.sealed_head(head.seq, head.hash, mac)
    )
    if fault is not None:
        kind, what = fault
        return ChainBreak(head.seq, kind, f"the chain head {what}")
    if records < head.seq:
        return ChainBreak(
            records + 1,
            BreakKind.REMOVED,
            f"records {records + 1} to {head.seq} were cut off the end (the sealed head "
            f"counts {head.seq})",
        )
    if hash_at_head != head.hash:
        return ChainBreak(
            head.seq,
            BreakKind.EDITED,
            f"record {head.seq} is not the record the sealed head names",
        )
    return None


def _seal_fault(
    key_id: str | None,
    mac: str | None,
    known: Mapping[str, AuditKey],
    sealed: Callable[[AuditKey, str], bool],
) -> tuple[BreakKind, str] | None:
    """What is wrong with the seal of a record or the head, if anything."""
    if key_id is None or mac is None:
        return (
            BreakKind.UNVERIFIABLE,
            "is not sealed (written by a store opened without the audit key)",
        )
    key = known.get(key_id)
    if key is None:
        return (
            BreakKind.UNVERIFIABLE,
            f"is sealed with key {key_id}, which is not loaded (a previous key missing from "
            "VOXAUTH_PREVIOUS_KEYS?)",
        )
    if not sealed(key, mac):
        return BreakKind.FORGED, "has a seal that does not match: rewritten without the audit key"
    return None


# --- export ------------------------------------------------------------------------------------


def jsonl_lines(records: Iterable[AuditRecord]) -> Iterator[str]:
    """One JSON object per record, without the line break. The hashed fields appear as hashed
    (`at` in microseconds; `details` as an object whose canonical text is the hashed string),
    so the chain can be rechecked from the export; `agent` and `time` are for reading."""
    for record in records:
        entry = record.entry
        yield json.dumps(
            {
                "seq": record.seq,
                "time": entry.time.isoformat(),
                "at": entry.at,
                "action": entry.action,
                "agent": record.agent,
                "agent_id": entry.agent_id,
                "agent_ref": entry.agent_ref,
                "outcome": entry.outcome,
                "details": _details_value(entry.details),
                "prev_hash": record.prev_hash,
                "hash": record.hash,
            }
        )


# CEF severities (0-10): refusals and locks rank highest, failed checks next, checks that
# could not decide after them; unknown outcomes rank medium, so a new one is never buried.
_SEVERITY_BY_OUTCOME = {
    "permission_denied": 8,
    "unauthenticated": 8,
    "locked": 8,
    "disabled": 8,
    "reject": 6,
    "unverified": 6,
    "rejected": 4,
    "undecided": 3,
    "incomplete": 3,
    "inconclusive": 3,
    "insufficient_speech": 3,
    "ok": 1,
    "accept": 1,
    "verified": 1,
    "ended": 1,
}
_UNKNOWN_OUTCOME_SEVERITY = 5


def cef_severity(outcome: str) -> int:
    return _SEVERITY_BY_OUTCOME.get(outcome.lower(), _UNKNOWN_OUTCOME_SEVERITY)


def cef_lines(records: Iterable[AuditRecord], product_version: str) -> Iterator[str]:
    """One ArcSight Common Event Format line per record, without the line break."""
    vendor = _cef_header("voxauth")
    version = _cef_header(product_version)
    for record in records:
        entry = record.entry
        action = _cef_header(entry.action)
        extension = [
            ("rt", str(entry.at // 1000)),
            ("externalId", str(record.seq)),
            ("act", entry.action),
            ("outcome", entry.outcome),
        ]
        if record.agent:
            extension.append(("duser", record.agent))
        if entry.agent_ref:
            extension += [("cs1Label", "agentRef"), ("cs1", entry.agent_ref)]
        extension += [
            ("cs2Label", "hash"),
            ("cs2", record.hash),
            ("cs3Label", "prevHash"),
            ("cs3", record.prev_hash),
            ("msg", entry.details),
        ]
        fields = " ".join(f"{name}={_cef_value(value)}" for name, value in extension)
        yield (
            f"CEF:0|{vendor}|{vendor}|{version}|{action}|{action}|"
            f"{cef_severity(entry.outcome)}|{fields}"
        )


def _cef_header(text: str) -> str:
    # A header field may not span lines at all, unlike an extension value.
    flat = " ".join(text.splitlines())
    return flat.replace("\\", "\\\\").replace("|", "\\|")


def _cef_value(text: str) -> str:
    return (
        text.replace("\\", "\\\\")
        .replace("=", "\\=")
        .replace("\r\n", "\\n")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
    )


def _details_value(details: str) -> Any:
    # Stored details are JSON; text someone edited into something else is exported as it is.
    try:
        return json.loads(details)
    except ValueError:
        return details
