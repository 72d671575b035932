"""Shift leases (server/shifts/lease.py) on every backend: the fencing token moves on with each
takeover, a write carrying a stale one is refused whole, renewal keeps only what its owner
still holds, and concurrent takeovers from several connections (replicas) each get a token of
their own."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import timedelta

import pytest

from server.errors import ShiftLeaseLostError, ShiftNotFoundError
from server.records import ShiftRecord, ShiftState
from server.storage.secure_store import SecureStore
from tests.contract.conftest import Storage
from tests.contract.samples import NOW, agent

LATER = NOW + timedelta(seconds=10)


def shift(store: SecureStore, shift_id: str = "shift-1", agent_id: str = "a-1") -> ShiftRecord:
    store.create_agent(agent(agent_id))
    record = ShiftRecord(shift_id, agent_id, "phone-1", ShiftState.VERIFIED, NOW, NOW)
    store.create_shift(record)
    return record


def test_each_takeover_moves_the_token_on_and_keeps_the_schedule(store: SecureStore) -> None:
    record = shift(store)
    assert store.shift_lease(record.shift_id) is None
    first, stored = store.take_shift_lease(
        record.shift_id, "replica-a", attached=False, expires_at=LATER
    )
    assert stored == record
    assert (first.owner, first.token, first.attached, first.expires_at) == (
        "replica-a",
        1,
        False,
        LATER,
    )
    scheduled = replace(first, checkpoint_seq=3, next_checkpoint_at=NOW + timedelta(minutes=7))
    with store.unit_of_work() as unit:
        unit.fence_shift(scheduled)
    second, _ = store.take_shift_lease(record.shift_id, "replica-b", attached=True, expires_at=NOW)
    assert second == replace(scheduled, owner="replica-b", token=2, attached=True, expires_at=NOW)
    assert store.shift_lease(record.shift_id) == second
    with pytest.raises(ShiftNotFoundError):
        store.take_shift_lease("no-such-shift", "replica-a", attached=True, expires_at=LATER)


def test_a_write_with_a_stale_token_is_refused_whole(store: SecureStore) -> None:
    record = shift(store)
    stale, _ = store.take_shift_lease(record.shift_id, "replica-a", attached=True, expires_at=LATER)
    store.take_shift_lease(record.shift_id, "replica-b", attached=True, expires_at=LATER)
    with pytest.raises(ShiftLeaseLostError), store.unit_of_work() as unit:
        unit.fence_shift(replace(stale, checkpoint_seq=1))
        unit.update_shift(replace(record, state=ShiftState.LOCKED))
    assert store.get_shift(record.shift_id).state is ShiftState.VERIFIED
    current = store.shift_lease(record.shift_id)
    assert current is not None and (current.owner, current.checkpoint_seq) == ("replica-b", 0)


def test_renewal_extends_what_its_owner_holds_and_reports_what_it_lost(
    store: SecureStore,
) -> None:
    kept = shift(store, "kept", "a-1")
    lost = shift(store, "lost", "a-2")
    held_kept, _ = store.take_shift_lease(kept.shift_id, "me", attached=True, expires_at=NOW)
    held_lost, _ = store.take_shift_lease(lost.shift_id, "me", attached=True, expires_at=NOW)
    taken, _ = store.take_shift_lease(lost.shift_id, "other", attached=False, expires_at=NOW)
    assert store.renew_shift_leases([held_kept, held_lost], LATER) == {"lost": taken}
    renewed = store.shift_lease(kept.shift_id)
    assert renewed == replace(held_kept, expires_at=LATER)
    assert store.shift_lease(lost.shift_id) == taken  # the other owner's lease is untouched


def test_a_lease_goes_with_its_agent(store: SecureStore) -> None:
    record = shift(store)
    lease, _ = store.take_shift_lease(record.shift_id, "me", attached=True, expires_at=LATER)
    store.delete_agent(record.agent_id)
    assert store.shift_lease(record.shift_id) is None
    assert store.renew_shift_leases([lease], LATER) == {record.shift_id: None}


def test_concurrent_takeovers_from_several_replicas_each_get_their_own_token(
    storage: Storage,
) -> None:
    replicas = [storage.open() for _ in range(3)]
    try:
        record = shift(replicas[0])
        tokens: list[int] = []
        lock = threading.Lock()

        def take(store: SecureStore, name: str) -> None:
            for _ in range(10):
                lease, _ = store.take_shift_lease(
                    record.shift_id, name, attached=True, expires_at=LATER
                )
                with lock:
                    tokens.append(lease.token)

        threads = [
            threading.Thread(target=take, args=(store, f"replica-{n}"))
            for n, store in enumerate(replicas)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(tokens) == list(range(1, 31))
        final = replicas[1].shift_lease(record.shift_id)
        assert final is not None and final.token == 30
    finally:
        for store in replicas:
            store.close()
