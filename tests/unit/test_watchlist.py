"""The watchlist's administration (enrollment/watchlist.py) and screening
(server/scoring/watchlist.py), on a real store with the fake voice: an entry needs a legal
basis, an expiry in range and usable, live audio; entries expire and are erased, audited
without the person's details; screening skips entries past their expiry and audits a match as
an alert."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from enrollment.watchlist import WatchlistService, expire_watchlist
from server.audit_actions import AuditAction
from server.config import AudioLimits, EnrollmentPolicy
from server.errors import (
    InvalidRequestError,
    WatchlistAudioRefusedError,
    WatchlistEntryNotFoundError,
)
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.speech import QualityThresholds
from server.records import WatchlistEntry
from server.scoring.gallery import GalleryMatch, GallerySearch, Probe
from server.scoring.watchlist import WatchlistScreen
from server.security.crypto import VoiceprintCipher
from server.storage.interface import Store
from server.storage.sqlite import open_store
from tests.fakes import (
    AGENT_AUDIO,
    AGENT_VOICE,
    TOO_SHORT_AUDIO,
    AllSpeech,
    FakeCountermeasure,
    FakeEmbedder,
    fake_presentation,
)
from tests.support import KEY

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=30)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    yield opened
    opened.close()


def watchlist(store: Store, pad_score: float | None = None) -> WatchlistService:
    presentation = (
        None
        if pad_score is None
        else fake_presentation(FakeCountermeasure(lambda waveform: pad_score))
    )
    analyser = VoiceAnalyser(
        FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits(), presentation
    )
    return WatchlistService(store, analyser, EnrollmentPolicy(), lambda: NOW)


def test_an_entry_is_kept_sealed_with_its_legal_basis_and_audited_without_it(
    store: Store,
) -> None:
    added = watchlist(store).add("Dismissed 11/2026", "LEGAL-7", LATER, AGENT_AUDIO, by="admin")
    (listed,) = store.watchlist_entries()
    assert listed.entry_id == added.entry_id and listed.legal_basis == "LEGAL-7"
    assert listed.expires_at == LATER and listed.telephone_embedding is not None
    (event,) = [e for e in store.audit_events() if e.action == AuditAction.WATCHLIST_ADD]
    assert event.details["entry_id"] == added.entry_id and event.details["by"] == "admin"
    assert "Dismissed" not in str(event.details) and "LEGAL" not in str(event.details)


@pytest.mark.parametrize(
    ("label", "legal_basis", "expires_at", "field"),
    [
        ("", "LEGAL-1", LATER, "label"),
        ("Someone", "", LATER, "legal_basis"),
        ("Someone", "LEGAL-1", NOW, "expires_at"),
        ("Someone", "LEGAL-1", NOW + timedelta(days=4000), "expires_at"),
    ],
)
def test_an_entry_needs_a_label_a_legal_basis_and_an_expiry_in_range(
    store: Store, label: str, legal_basis: str, expires_at: datetime, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        watchlist(store).add(label, legal_basis, expires_at, AGENT_AUDIO, by="admin")
    assert refused.value.field == field
    assert store.watchlist_entries() == []


def test_unusable_or_synthetic_audio_makes_no_entry(store: Store) -> None:
    with pytest.raises(WatchlistAudioRefusedError, match="not usable"):
        watchlist(store).add("Short", "LEGAL-1", LATER, TOO_SHORT_AUDIO, by="admin")
    with pytest.raises(WatchlistAudioRefusedError, match="synthetic"):
        watchlist(store, pad_score=-9.0).add("Fake", "LEGAL-1", LATER, AGENT_AUDIO, by="admin")
    assert store.watchlist_entries() == []


def test_entries_expire_and_are_erased_each_audited(store: Store) -> None:
    service = watchlist(store)
    soon = service.add("Soon", "L-1", NOW + timedelta(days=1), AGENT_AUDIO, by="admin")
    kept = service.add("Kept", "L-2", LATER, AGENT_AUDIO, by="admin")
    assert expire_watchlist(store, NOW + timedelta(days=2)) == [soon.entry_id]
    assert [e.entry_id for e in store.watchlist_entries()] == [kept.entry_id]
    service.delete(kept.entry_id, by="admin")
    assert store.watchlist_entries() == []
    with pytest.raises(WatchlistEntryNotFoundError):
        service.delete(kept.entry_id, by="admin")
    actions = [e.action for e in store.audit_events()]
    assert actions.count(AuditAction.WATCHLIST_EXPIRE) == 1
    assert actions.count(AuditAction.WATCHLIST_DELETE) == 1


class MatchEverything:
    """Stands in for GallerySearch: every entry it is given matches."""

    def __init__(self) -> None:
        self.searched: list[list[str]] = []

    def search_watchlist(
        self, probe: Probe, entries: list[WatchlistEntry], model_id: str, false_alarm: float
    ) -> GalleryMatch | None:
        self.searched.append([e.entry_id for e in entries])
        if not entries:
            return None
        return GalleryMatch(entries[0].entry_id, 9.0, 4.0, 5.0, len(entries))


def test_screening_skips_expired_entries_and_audits_an_alert(store: Store) -> None:
    service = watchlist(store)
    expired = service.add("Old", "L-1", NOW + timedelta(days=1), AGENT_AUDIO, by="admin")
    live = service.add("Live", "L-2", LATER, AGENT_AUDIO, by="admin")
    search = MatchEverything()
    clock = [NOW + timedelta(days=2)]
    screen = WatchlistScreen(store, cast(GallerySearch, search), 0.001, lambda: clock[0])
    probe = Probe(AGENT_VOICE, 4.0)

    match = screen.screen("agent-1", probe, FakeEmbedder.model_id, AuditAction.VERIFY)
    assert match is not None and match.reference_id == live.entry_id
    # The expired entry, not yet swept, is not searched.
    assert search.searched == [[live.entry_id]]
    assert expired.entry_id not in search.searched[0]
    (alert,) = [e for e in store.audit_events() if e.action == AuditAction.WATCHLIST_MATCH]
    assert alert.outcome == "alert" and alert.details["check"] == "verify"
    assert alert.details["entry_id"] == live.entry_id and alert.details["watchlist_size"] == 1

    clock[0] = LATER
    assert screen.screen("agent-1", probe, FakeEmbedder.model_id, AuditAction.VERIFY) is None
