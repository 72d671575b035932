"""The agents as HR reviews them: where each one's enrollment stands, how old its voiceprint
is and when it expires, a page at a time in agent id order.

Paging is by position: a page ends at an agent id, and the next starts after it, so agents
created or erased between pages neither repeat nor shift the others. How that position
travels to the caller (sealed, bound to the caller and the filters) is the API's concern
(server/api/page_tokens.py).
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from server.config import EnrollmentPolicy, RetentionPolicy
from server.errors import InvalidRequestError
from server.records import AgentOverview
from server.storage.interface import VoiceprintStore
from server.validation import validate_agent_id

MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 100


class EnrollmentState(enum.Enum):
    """Where an agent's enrollment stands. New ways to enroll add their states here (and to
    `enrollment_state`); a filter names any set of them."""

    NOT_STARTED = "not started"
    """Created with consent; no enrollment speech yet."""
    COLLECTING = "collecting"
    """Speech pending, less than finalizing needs."""
    READY_TO_FINALIZE = "ready to finalize"
    """Enough pending speech: FinalizeEnrollment can build the voiceprint."""
    ENROLLED = "enrolled"
    """A voiceprint exists (pending speech, if any, is a re-enrollment under way)."""


@dataclass(frozen=True)
class AgentFilter:
    """Which agents a listing holds; every condition set must hold."""

    states: frozenset[EnrollmentState] = frozenset()
    """Empty: every state."""
    voiceprint_older_than: timedelta | None = None
    """Only voiceprints made longer ago than this."""
    voiceprint_expires_within: timedelta | None = None
    """Only voiceprints that retention erases within this long unless used."""
    agent_id_prefix: str = ""

    @classmethod
    def of(
        cls,
        states: Collection[EnrollmentState],
        older_than_days: float,
        expires_within_days: float,
        agent_id_prefix: str = "",
    ) -> AgentFilter:
        """From the API's numbers: 0 days means no condition; a negative one is refused."""
        for name, days in (
            ("voiceprint_older_than_days", older_than_days),
            ("voiceprint_expires_within_days", expires_within_days),
        ):
            if not days >= 0 or days > 36_500:  # NaN fails the first test
                raise InvalidRequestError(
                    f"{name} must be 0 (no filter) to 36500 days; got {days}", field=name
                )
        if agent_id_prefix:
            validate_agent_id(agent_id_prefix)
        return cls(
            frozenset(states),
            timedelta(days=older_than_days) if older_than_days else None,
            timedelta(days=expires_within_days) if expires_within_days else None,
            agent_id_prefix,
        )


@dataclass(frozen=True)
class AgentListing:
    overview: AgentOverview
    state: EnrollmentState
    required_net_speech_seconds: float
    voiceprint_expires_at: datetime | None
    """When retention erases the voiceprint unless a check uses it; None without one."""


@dataclass(frozen=True)
class AgentPage:
    agents: list[AgentListing] = field(default_factory=list)
    last_agent_id: str | None = None
    """Where the next page starts after; None on the last page."""


def enrollment_state(
    overview: AgentOverview, required_net_speech_seconds: float
) -> EnrollmentState:
    if overview.voiceprint is not None:
        return EnrollmentState.ENROLLED
    if overview.pending_utterances == 0:
        return EnrollmentState.NOT_STARTED
    if overview.pending_net_speech_seconds >= required_net_speech_seconds:
        return EnrollmentState.READY_TO_FINALIZE
    return EnrollmentState.COLLECTING


class AgentDirectory:
    """Lists agents for HR. Reads only: nothing here is audited (GetEnrollmentStatus is not
    either); what the list shows is what HR may already read agent by agent."""

    def __init__(
        self, store: VoiceprintStore, policy: EnrollmentPolicy, retention: RetentionPolicy
    ) -> None:
        self._store = store
        self._required = policy.required_net_speech_seconds
        self._ttl = timedelta(days=retention.voiceprint_ttl_days)

    def page(
        self, wanted: AgentFilter, *, after: str | None, size: int, now: datetime
    ) -> AgentPage:
        """Up to `size` agents that pass `wanted`, with ids after `after` (None: from the
        first)."""
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise InvalidRequestError(
                f"page_size must be 1 to {MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE}); got {size}",
                field="page_size",
            )
        listed: list[AgentListing] = []
        for overview in self._store.agent_overviews():
            if after is not None and overview.agent.agent_id <= after:
                continue
            listing = self._listing(overview)
            if not _passes(listing, wanted, now):
                continue
            if len(listed) == size:
                # One more exists: the page ends at the last one it holds.
                return AgentPage(listed, listed[-1].overview.agent.agent_id)
            listed.append(listing)
        return AgentPage(listed, None)

    def _listing(self, overview: AgentOverview) -> AgentListing:
        voiceprint = overview.voiceprint
        last_used = None if voiceprint is None else voiceprint.last_used_at or voiceprint.created_at
        return AgentListing(
            overview,
            enrollment_state(overview, self._required),
            self._required,
            None if last_used is None else last_used + self._ttl,
        )


def _passes(listing: AgentListing, wanted: AgentFilter, now: datetime) -> bool:
    if not listing.overview.agent.agent_id.startswith(wanted.agent_id_prefix):
        return False
    if wanted.states and listing.state not in wanted.states:
        return False
    voiceprint = listing.overview.voiceprint
    if wanted.voiceprint_older_than is not None and (
        voiceprint is None or voiceprint.created_at > now - wanted.voiceprint_older_than
    ):
        return False
    expires = listing.voiceprint_expires_at
    return wanted.voiceprint_expires_within is None or (
        expires is not None and expires <= now + wanted.voiceprint_expires_within
    )
