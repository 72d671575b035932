"""What a backend holding data from before per-agent keys (the SQLite schema up to version 6)
hands the store above it to upgrade that data, in the migration's own transactions: agents
named by their id in clear, embeddings sealed directly under the service key, assurance
tokens in clear. A backend without such history never uses it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from server.records import AgentRecord, AssuranceRecord, ThrottleState
from server.storage.backend import ShiftRow, Transaction, UtteranceRow, VoiceprintRow


@dataclass(frozen=True)
class LegacyAgent:
    """One agent as stored before per-agent keys. Its rows already carry its audit pseudonym
    as agent_ref; their embeddings are sealed under the service key, bound to the agent id."""

    agent: AgentRecord
    audit_pseudonym: str
    utterances: list[UtteranceRow]
    voiceprint: VoiceprintRow | None
    shifts: list[ShiftRow]
    assurances: list[AssuranceRecord]
    throttle: ThrottleState


class Upgrade(Protocol):
    """The store's side of upgrading old data (server/storage/upgrade.py)."""

    def prepare_keys(self, txn: Transaction, agent_ids: Sequence[str]) -> None:
        """Creates the store's keys and a data key for each agent id that has none, in a
        transaction of their own that commits before the rows sealed under them."""

    def chain_carried_over_audit(self, txn: Transaction, pseudonyms: Mapping[str, str]) -> None:
        """Chains and seals the audit rows of a database from before the chain, given each
        existing agent's new pseudonym by id."""

    def seal_agents(self, txn: Transaction, agents: Iterable[LegacyAgent]) -> None:
        """Writes each agent anew, everything of it sealed under its data key."""
