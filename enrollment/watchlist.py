"""The watchlist's administration: an admin adds the voice of a known fraudster or dismissed
employee from audio, with the legal basis it is kept under and an expiry; lists and erases
entries; and the retention sweep erases those past their expiry. Every step is audited (never
with audio or embeddings). Screening checks against it is server/scoring/watchlist.py's.

An entry is made as an enrollment utterance is: the same quality gates and countermeasure (a
synthetic voice on the watchlist would raise alerts for whoever it resembles), only the
embedding and its telephone companion kept, sealed under the store's watchlist key.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from server.audit_actions import AuditAction
from server.config import EnrollmentPolicy
from server.errors import (
    InvalidRequestError,
    WatchlistAudioRefusedError,
    WatchlistEntryNotFoundError,
)
from server.pipeline.analysis import ReceivedAudio, VoiceAnalyser
from server.records import AuditEvent, WatchlistEntry
from server.storage.interface import VoiceprintStore
from server.validation import validate_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchlistService:
    store: VoiceprintStore
    analyser: VoiceAnalyser
    policy: EnrollmentPolicy
    now: Callable[[], datetime]

    def add(
        self,
        label: str,
        legal_basis: str,
        expires_at: datetime,
        audio: ReceivedAudio,
        *,
        by: str,
    ) -> WatchlistEntry:
        """Blocking: runs the model."""
        label = validate_text(label, "label", 256)
        # Biometric data of someone who did not consent: only under a recorded legal basis.
        legal_basis = validate_text(legal_basis, "legal_basis", 256)
        now = self.now()
        if expires_at <= now:
            raise InvalidRequestError("expires_at must be in the future", field="expires_at")
        if expires_at > now + timedelta(days=self.policy.watchlist_max_days):
            raise InvalidRequestError(
                f"expires_at must be at most {self.policy.watchlist_max_days:g} days away",
                field="expires_at",
            )
        sample = self.analyser.analyse(
            audio, min_net_speech_seconds=self.policy.min_utterance_net_speech_seconds
        )
        quality = sample.quality
        if sample.embedding is None or quality.issues:
            raise WatchlistAudioRefusedError(
                f"the audio is not usable for a watchlist entry ({quality.net_speech_seconds:.1f}"
                f" s of net speech, issues: "
                f"{', '.join(i.name.lower() for i in quality.issues) or 'too little speech'})"
            )
        presentation = sample.presentation
        if presentation is not None and presentation.refuses:
            raise WatchlistAudioRefusedError(
                "the audio was taken for synthetic, converted or replayed speech "
                f"(countermeasure score {presentation.score:.2f} < {presentation.threshold:.2f})"
            )
        entry = WatchlistEntry(
            entry_id=uuid.uuid4().hex,
            label=label,
            legal_basis=legal_basis,
            model_id=self.analyser.model_id,
            embedding=sample.embedding,
            added_at=now,
            expires_at=expires_at,
            net_speech_seconds=quality.net_speech_seconds,
            telephone_embedding=self.analyser.telephone_embedding(quality.speech),
        )
        added = AuditEvent(
            AuditAction.WATCHLIST_ADD,
            "",
            "ok",
            now,
            {
                "entry_id": entry.entry_id,
                "by": by,
                "expires_at": expires_at.isoformat(),
                "net_speech_seconds": round(quality.net_speech_seconds, 2),
            },
        )
        with self.store.unit_of_work("add a watchlist entry") as unit:
            unit.add_watchlist_entry(entry)
            unit.append_audit(added)
        log.info("watchlist entry %s added by %s", entry.entry_id, by)
        return entry

    def entries(self) -> list[WatchlistEntry]:
        return self.store.watchlist_entries()

    def delete(self, entry_id: str, *, by: str) -> None:
        if not entry_id or len(entry_id) > 64:
            raise InvalidRequestError("entry_id is required", field="entry_id")
        with self.store.unit_of_work(f"delete watchlist entry {entry_id!r}") as unit:
            if not unit.delete_watchlist_entry(entry_id):
                raise WatchlistEntryNotFoundError(f"no watchlist entry {entry_id!r}")
            unit.append_audit(
                AuditEvent(
                    AuditAction.WATCHLIST_DELETE,
                    "",
                    "ok",
                    self.now(),
                    {"entry_id": entry_id, "by": by},
                )
            )
        log.info("watchlist entry %s erased by %s", entry_id, by)


def expire_watchlist(store: VoiceprintStore, now: datetime) -> list[str]:
    """Erases the entries past their expiry, each audited in the same unit of work. Blocking."""
    with store.unit_of_work("expire watchlist entries") as unit:
        expired = unit.expire_watchlist(now)
        for entry_id in expired:
            unit.append_audit(
                AuditEvent(AuditAction.WATCHLIST_EXPIRE, "", "ok", now, {"entry_id": entry_id})
            )
    for entry_id in expired:
        log.info("watchlist entry %s expired", entry_id)
    return expired
