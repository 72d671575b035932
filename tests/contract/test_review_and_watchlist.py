"""The store's part in passive enrollment, HR review and the watchlist (issue 14): the
passive-enrollment mark, held voiceprints (sealed as held: they do not open as active ones),
and watchlist entries sealed under the store's watchlist key, expiring and erasable, with that
key rotated like the others."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta

import numpy as np
import psycopg
import pytest

from server.errors import AgentNotFoundError, ConfigurationError, StorageError
from server.records import HeldVoiceprint, HoldReason, WatchlistEntry
from server.security.crypto import VoiceprintCipher
from server.storage.secure_store import SecureStore
from tests.contract.conftest import KEY, PostgresStorage, SqliteStorage, Storage
from tests.contract.samples import MODEL, NOW, agent, unit_vector, utterance, voiceprint


def held(agent_id: str, reason: HoldReason, matched: str = "") -> HeldVoiceprint:
    return HeldVoiceprint(
        voiceprint(agent_id, f"{agent_id}-held"),
        reason,
        NOW,
        matched_agent_id=matched,
        similarity=7.5 if matched else 0.0,
    )


def entry(entry_id: str, expires_in_days: float = 30) -> WatchlistEntry:
    return WatchlistEntry(
        entry_id=entry_id,
        label=f"Fraudster {entry_id}",
        legal_basis=f"LEGAL-{entry_id}",
        model_id=MODEL,
        embedding=unit_vector(entry_id),
        added_at=NOW,
        expires_at=NOW + timedelta(days=expires_in_days),
        net_speech_seconds=9.5,
        telephone_embedding=unit_vector(entry_id + "-phone"),
    )


def test_the_passive_mark_is_kept_until_ended(store: SecureStore) -> None:
    store.create_agent(agent("p"))
    assert store.passive_enrollment("p") is None
    with store.unit_of_work() as unit:
        unit.set_passive_enrollment("p", NOW)
    assert store.passive_enrollment("p") == NOW
    with store.unit_of_work() as unit:
        unit.end_passive_enrollment("p")
        unit.end_passive_enrollment("nobody")  # Nothing to end: no error.
    assert store.passive_enrollment("p") is None
    with pytest.raises(AgentNotFoundError), store.unit_of_work() as unit:
        unit.set_passive_enrollment("nobody", NOW)


def test_a_held_voiceprint_is_kept_beside_the_active_one_and_names_its_match(
    store: SecureStore,
) -> None:
    for agent_id in ("first", "second"):
        store.create_agent(agent(agent_id))
    active = voiceprint("second", "second-active")
    store.replace_voiceprint(active, [])
    store.add_utterance(utterance("second", 1), 10)
    with store.unit_of_work() as unit:
        unit.hold_voiceprint(held("second", HoldReason.DUPLICATE, "first"), ["second-u1"])

    got = store.held_voiceprint("second")
    assert got is not None
    assert got.reason is HoldReason.DUPLICATE and got.matched_agent_id == "first"
    assert np.array_equal(got.voiceprint.embedding, unit_vector("second-held"))
    assert got.voiceprint.telephone_embedding is not None
    assert got.similarity == 7.5 and got.held_at == NOW
    # The active voiceprint stays; the consumed utterance is gone.
    current = store.get_voiceprint("second")
    assert current is not None and np.array_equal(current.embedding, active.embedding)
    assert store.pending_utterances("second") == []

    # Once the matching agent is erased, the held voiceprint no longer names it.
    store.delete_agent("first")
    again = store.held_voiceprint("second")
    assert again is not None and again.matched_agent_id == ""

    with store.unit_of_work() as unit:
        released = unit.release_held_voiceprint("second")
        assert released is not None and released.reason is HoldReason.DUPLICATE
        assert unit.release_held_voiceprint("second") is None
    assert store.held_voiceprint("second") is None


def test_a_held_voiceprint_does_not_open_as_an_active_one(
    storage: Storage, store: SecureStore
) -> None:
    store.create_agent(agent("h"))
    with store.unit_of_work() as unit:
        unit.hold_voiceprint(held("h", HoldReason.APPROVAL), [])
    # Someone with write access to the rows moves the held voiceprint into the active place:
    # its blobs are bound to being held, so it does not open as the agent's voiceprint.
    move = (
        "INSERT INTO voiceprints SELECT agent_ref, model_id, embedding, created_at, "
        "utterance_count, net_speech_seconds, telephone_embedding, created_at "
        "FROM held_voiceprints"
    )
    if isinstance(storage, SqliteStorage):
        with closing(sqlite3.connect(storage.path)) as conn, conn:
            conn.execute(move)
    else:
        assert isinstance(storage, PostgresStorage)
        with psycopg.connect(storage.conninfo, autocommit=True) as pg:
            pg.execute(move)
    with pytest.raises(StorageError):
        store.get_voiceprint("h")


def test_erasing_the_agent_erases_its_mark_and_its_held_voiceprint(store: SecureStore) -> None:
    store.create_agent(agent("gone"))
    with store.unit_of_work() as unit:
        unit.set_passive_enrollment("gone", NOW)
        unit.hold_voiceprint(held("gone", HoldReason.APPROVAL), [])
    store.delete_agent("gone")
    store.create_agent(agent("gone"))
    assert store.passive_enrollment("gone") is None
    assert store.held_voiceprint("gone") is None


def test_watchlist_entries_are_kept_listed_expired_and_erased(store: SecureStore) -> None:
    assert store.watchlist_entries() == []
    with store.unit_of_work() as unit:
        unit.add_watchlist_entry(entry("e1", expires_in_days=1))
        unit.add_watchlist_entry(entry("e2", expires_in_days=60))
        unit.add_watchlist_entry(entry("e3", expires_in_days=90))
    listed = store.watchlist_entries()
    assert [e.entry_id for e in listed] == ["e1", "e2", "e3"]
    first = listed[0]
    assert first.label == "Fraudster e1" and first.legal_basis == "LEGAL-e1"
    assert np.array_equal(first.embedding, unit_vector("e1"))
    assert first.telephone_embedding is not None and first.net_speech_seconds == 9.5

    with store.unit_of_work() as unit:
        assert unit.expire_watchlist(NOW + timedelta(days=2)) == ["e1"]
        assert unit.delete_watchlist_entry("e3")
        assert not unit.delete_watchlist_entry("e3")
    assert [e.entry_id for e in store.watchlist_entries()] == ["e2"]


def test_the_watchlist_is_sealed_under_a_key_the_store_rotates(storage: Storage) -> None:
    store = storage.open()
    with store.unit_of_work() as unit:
        unit.add_watchlist_entry(entry("sealed"))
    store.close()

    # Nothing of it is in the clear in the backend's rows.
    backend = storage.backend()
    with backend.transaction("read", write=False) as txn:
        (row,) = txn.watchlist()
    backend.close()
    assert b"Fraudster" not in row.sealed_details and b"LEGAL" not in row.sealed_details
    assert unit_vector("sealed").tobytes() not in row.sealed_embedding

    # A new service key: the watchlist key is wrapped anew with the agents' keys.
    new_key = bytes(range(1, 33))
    rotating = storage.open(VoiceprintCipher(new_key, previous_keys=[KEY]))
    try:
        report = rotating.reencrypt_all(batch_size=10)
        assert report.data_keys >= 2  # The handle key and the watchlist key.
    finally:
        rotating.close()
    after = storage.open(VoiceprintCipher(new_key))
    try:
        assert [e.entry_id for e in after.watchlist_entries()] == ["sealed"]
    finally:
        after.close()
    with pytest.raises(ConfigurationError):
        storage.open(VoiceprintCipher(KEY))
