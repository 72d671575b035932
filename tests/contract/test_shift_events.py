"""The events table of the replicas' event bus (server/shifts/event_bus.py) on every backend:
ids grow and are never given twice, a page reads in id order, old events are dropped, an
event is sealed under its agent's key and erased with the agent."""

from __future__ import annotations

import threading
from datetime import timedelta

from server.storage.secure_store import SecureStore
from tests.contract.conftest import Storage
from tests.contract.samples import NOW, agent

PAYLOAD = b'{"kind":"SHIFT_LOCKED","agent":"a-1","secret-marker":"Xq7"}'


def test_events_read_back_in_id_order_from_any_point(store: SecureStore) -> None:
    store.create_agent(agent("a-1"))
    store.create_agent(agent("a-2"))
    assert store.latest_event_id() == 0
    assert store.oldest_event_id() is None
    ids = [
        store.append_event(f"a-{1 + n % 2}", f"event {n}".encode(), NOW, NOW - timedelta(hours=1))
        for n in range(5)
    ]
    assert ids == sorted(ids) and len(set(ids)) == 5
    assert store.latest_event_id() == ids[-1]
    assert store.events_after(0, 100) == [(i, f"event {n}".encode()) for n, i in enumerate(ids)]
    assert store.events_after(ids[1], 2) == [(ids[2], b"event 2"), (ids[3], b"event 3")]
    assert store.events_after(ids[-1], 100) == []
    assert store.oldest_event_id() == ids[0]


def test_old_events_go_and_ids_are_never_given_again(store: SecureStore) -> None:
    store.create_agent(agent("a-1"))
    first = store.append_event("a-1", b"old", NOW, NOW - timedelta(hours=1))
    later = NOW + timedelta(hours=2)
    second = store.append_event("a-1", b"new", later, later - timedelta(hours=1))
    assert store.events_after(0, 100) == [(second, b"new")]
    assert second > first
    # What a resuming subscriber is told: the oldest kept is after the one dropped.
    assert store.oldest_event_id() == second
    # Even once the newest is gone, the next id is higher (a replica reading after `second`
    # would otherwise miss it).
    much_later = later + timedelta(hours=2)
    third = store.append_event("a-1", b"newest", much_later, much_later)
    assert third > second
    assert store.latest_event_id() == third


def test_an_event_is_sealed_and_goes_with_its_agent(storage: Storage, store: SecureStore) -> None:
    store.create_agent(agent("a-1"))
    store.create_agent(agent("a-2"))
    erased = store.append_event("a-1", PAYLOAD, NOW, NOW - timedelta(hours=1))
    kept = store.append_event("a-2", b"kept", NOW, NOW - timedelta(hours=1))
    backend = storage.backend()
    try:
        with backend.transaction("read", write=False) as txn:
            rows = txn.events_after(0, 10)
        assert all(b"secret-marker" not in row.sealed_payload for row in rows)
        assert all(b"a-1" not in row.sealed_payload for row in rows)
    finally:
        backend.close()
    store.delete_agent("a-1")
    assert store.events_after(0, 100) == [(kept, b"kept")]
    assert erased < kept


def test_a_listing_after_an_id_pages_through_every_event_once_in_order(store: SecureStore) -> None:
    """How a subscriber resumes (server/shifts/service.py): page after page from an id, each
    page starting after the last id of the one before, gives every later event exactly
    once, whoever's it is; an id beyond the newest gives nothing."""
    store.create_agent(agent("a-1"))
    store.create_agent(agent("a-2"))
    ids = [
        store.append_event(f"a-{1 + n % 2}", f"event {n}".encode(), NOW, NOW - timedelta(hours=1))
        for n in range(12)
    ]
    seen: list[int] = []
    after = ids[2]
    while page := store.events_after(after, 4):
        seen += [event_id for event_id, _ in page]
        after = page[-1][0]
    assert seen == ids[3:]
    assert store.events_after(ids[-1] + 1000, 4) == []
    assert store.events_after(-5, 2) == [(ids[0], b"event 0"), (ids[1], b"event 1")]


def test_the_latest_id_is_never_one_of_a_write_still_in_progress(store: SecureStore) -> None:
    """A replica opening its event bus, or checking a resume id, reads the latest id while
    another replica may be storing an event. PostgreSQL's sequence counts the id of a
    transaction not yet committed: a bus that started after it never delivered that event,
    and a check that saw the id with the event not yet readable refused a subscriber resuming
    from the start as expired (the CI timeout of tests/e2e/test_replicas.py's resume test)."""
    store.create_agent(agent("a-1"))
    before = store.append_event("a-1", b"committed", NOW, NOW - timedelta(hours=1))
    inserted, release = threading.Event(), threading.Event()
    given: list[int] = []

    def writer() -> None:
        with store.unit_of_work("store an event, slowly") as unit:
            given.append(unit.append_event("a-1", b"in progress", NOW, NOW - timedelta(hours=1)))
            inserted.set()
            release.wait(30)

    read: list[tuple[int, list[int]]] = []

    def reader() -> None:
        latest = store.latest_event_id()
        read.append((latest, [i for i, _ in store.events_after(0, 100)]))

    writing = threading.Thread(target=writer)
    writing.start()
    assert inserted.wait(30)
    reading = threading.Thread(target=reader)
    reading.start()
    # The reader either answers at once (it may say `before`: the event is not committed) or
    # waits for the write; give it the time to answer at once, then let the write commit.
    reading.join(2.0)
    release.set()
    writing.join(30)
    reading.join(30)
    [(latest, readable)] = read
    assert latest in (before, given[0])
    # Whatever the latest id it was told, every event up to it was readable right after.
    assert [i for i in readable if i <= latest] == [i for i in (before, *given) if i <= latest]
