"""Screening voices against the watchlist (known fraudsters, dismissed employees): every
Verify, shift login and new voiceprint is searched for among the entries not yet expired, with
the 1:N bound for the watchlist's size (server/scoring/gallery.py). A match is audited as an
alert; what else it does (refuse, hold, announce) is the caller's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from server.audit_actions import AuditAction
from server.records import AuditEvent
from server.scoring.gallery import GalleryMatch, GallerySearch, Probe
from server.storage.interface import VoiceprintStore

log = logging.getLogger(__name__)


class WatchlistScreen:
    def __init__(
        self,
        store: VoiceprintStore,
        search: GallerySearch,
        false_alarm: float,
        now: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._search = search
        self._false_alarm = false_alarm
        self._now = now

    def match(self, probe: Probe, model_id: str) -> GalleryMatch | None:
        """The entry `probe` matches, unaudited (for a caller that audits it in its own unit
        of work). Blocking: reads the store and scores."""
        now = self._now()
        entries = [e for e in self._store.watchlist_entries() if e.expires_at > now]
        return self._search.search_watchlist(probe, entries, model_id, self._false_alarm)

    def screen(
        self, agent_id: str, probe: Probe, model_id: str, check: AuditAction
    ) -> GalleryMatch | None:
        """As `match`, and a match is audited as a WATCHLIST_MATCH alert of `check`."""
        match = self.match(probe, model_id)
        if match is not None:
            event = alert_event(agent_id, match, check, self._now())
            self._store.append_audit(event)
            log.warning(
                "watchlist alert: %s of agent %s matches watchlist entry %s (score %.2f >= %.2f)",
                check,
                agent_id,
                match.reference_id,
                match.normalized,
                match.threshold,
            )
        return match


def alert_event(agent_id: str, match: GalleryMatch, check: AuditAction, at: datetime) -> AuditEvent:
    return AuditEvent(
        AuditAction.WATCHLIST_MATCH,
        agent_id,
        "alert",
        at,
        {
            "check": check.value,
            "entry_id": match.reference_id,
            "normalized_score": round(match.normalized, 3),
            "threshold": round(match.threshold, 3),
            "watchlist_size": match.gallery_size,
        },
    )
