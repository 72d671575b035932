"""Replicas sharing shifts through leases with fencing tokens, and their events through the
event bus (issue 15, point 2): two ShiftServices, each with its own connection to one SQLite
file (as two processes on one host would be) or to the tests' PostgreSQL, on one test clock,
with the fake voice."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import psycopg
import pytest

from server.audit_actions import AuditAction
from server.config import AudioLimits, InferenceLimits, ShiftPolicy, StoreLimits
from server.errors import (
    EventsExpiredError,
    InvalidRequestError,
    ShiftLeaseLostError,
    StorageError,
    UnavailableError,
)
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.decode import AudioEncoding
from server.pipeline.speech import QualityThresholds
from server.records import AgentRecord, ShiftRecord, ShiftState, Voiceprint
from server.runtime.inference import InferencePool
from server.runtime.store_pool import StorePool
from server.security.audit import AuditKey, verify_log
from server.security.crypto import VoiceprintCipher
from server.shifts.buffer import StreamFormat
from server.shifts.change_watch import CheckpointTrigger
from server.shifts.event_bus import EventBus, StoreEventBus, decode_event, encode_event
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.lease import LeasedSession
from server.shifts.service import EventSubscription, ShiftService, ShiftStream
from server.storage.databases import event_wakeups, open_store
from server.storage.secure_store import SecureStore
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_AUDIO,
    AGENT_VOICE,
    MODEL_ID,
    AllSpeech,
    FakeEmbedder,
    fake_verification,
    pcm16,
)
from tests.postgres import PostgresServer

KEY = bytes(range(32))
AUDIT_KEY = AuditKey(KEY)
AGENT = "agent-7"
POLICY = replace(
    ShiftPolicy(),
    mean_checkpoint_interval_seconds=100.0,
    checkpoint_jitter_seconds=0.0,
    min_checkpoint_gap_seconds=10.0,
    checkpoint_net_speech_seconds=2.0,
    # The longer check that can lock is tested in tests/unit/test_change_watch.py.
    confirm_net_speech_seconds=2.0,
    speech_wait_seconds=30.0,
    speech_recheck_seconds=1.0,
    lease_seconds=6.0,
)
PCM = StreamFormat(AudioEncoding.PCM16LE, 16_000)
RETENTION_SECONDS = 3600.0
T = TypeVar("T")


@dataclass
class Replica:
    store: SecureStore
    shifts: ShiftService
    events: EventBus
    pools: tuple[InferencePool, StorePool]
    stopped: bool = False

    async def stop(self) -> None:
        """As the process dies: its tasks stop, nothing is released in the store."""
        if self.stopped:
            return
        self.stopped = True
        await self.shifts.close()
        await self.events.close()
        for pool in self.pools:
            pool.shutdown()
        self.store.close()


async def replica(location: str | Path, scoring: Path, clock: ManualClock) -> Replica:
    """One replica on the database at `location`, with the event bus the server would give
    it (server/app.py)."""
    store = open_store(location, VoiceprintCipher(KEY), audit_key=AUDIT_KEY)
    pool, store_pool = InferencePool(InferenceLimits()), StorePool(StoreLimits())
    analyser = VoiceAnalyser(FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    events: EventBus = StoreEventBus(
        store, store_pool, event_wakeups(location), clock, RETENTION_SECONDS
    )
    await events.open()
    shifts = ShiftService(
        store,
        fake_verification(store, scoring, clock.now),
        analyser,
        AllSpeech(),
        pool,
        store_pool,
        POLICY,
        clock,
        events=events,
    )
    return Replica(store, shifts, events, (pool, store_pool))


@asynccontextmanager
async def two_replicas(
    tmp_path: Path, location: str | Path | None = None
) -> AsyncIterator[tuple[Replica, Replica, ManualClock]]:
    """Two replicas on one database: SQLite in tmp_path unless `location` names another."""
    clock = ManualClock()
    where = location or tmp_path / "voxauth.db"
    one = await replica(where, tmp_path, clock)
    now = clock.now()
    one.store.create_agent(AgentRecord(AGENT, "Agent 7", "HR-1", now))
    one.store.replace_voiceprint(Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, now, 3, 30.0), [])
    two = await replica(where, tmp_path, clock)
    try:
        yield one, two, clock
    finally:
        for each in (one, two):
            await each.stop()


async def eventually(what: Callable[[], Awaitable[T]], seconds: float = 10.0) -> T:
    """`what()`, waited for in real time: the store and inference run on threads."""
    return await asyncio.wait_for(what(), seconds)


async def next_kind(stream: ShiftStream, *skip: ShiftEventKind) -> ShiftEvent:
    while True:
        event = await eventually(stream.next_event)
        assert event is not None, "the stream ended"
        if event.kind not in skip:
            return event


async def settle(clock: ManualClock, seconds: float) -> None:
    """Moves the clock on, then lets the woken tasks reach their next wait (real time: they
    go through the store's threads)."""
    clock.advance(seconds)
    for _ in range(20):
        await asyncio.sleep(0.01)


async def started(one: Replica) -> str:
    outcome = await one.shifts.start(AGENT, "phone-1", AGENT_AUDIO)
    assert outcome.shift.state is ShiftState.VERIFIED
    return outcome.shift.shift_id


def speak(stream: ShiftStream, seconds: int = 3, level: float = 0.1) -> None:
    for _ in range(seconds):  # a message carries at most 1 s (50 frames)
        stream.push(pcm16(level, 1.0))


def checkpoint_audits(store: SecureStore) -> list[str]:
    return [
        e.outcome for e in store.audit_events(AGENT) if e.action == AuditAction.SHIFT_CHECKPOINT
    ]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str | Path:
    if request.param == "sqlite":
        return tmp_path / "voxauth.db"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.new_database()


def test_a_softphone_that_reconnects_to_another_replica_keeps_the_checkpoint_schedule(
    tmp_path: Path, database: str | Path
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)  # attached
            await settle(clock, 99)
            speak(on_one)  # audio is kept for 90 s only
            await settle(clock, 1)
            assert (await next_kind(on_one)).kind is ShiftEventKind.CHECKPOINT_PASSED
            lease = one.store.shift_lease(shift_id)
            assert lease is not None and lease.checkpoint_seq == 1
            due = lease.next_checkpoint_at
            assert due == clock.now() + timedelta(seconds=100)

            await one.stop()  # kill -9: no lease released, no goodbye
            await settle(clock, 50)
            on_two = await two.shifts.attach(shift_id, PCM)
            attached = await next_kind(on_two)
            assert attached.shift.checkpoints_passed == 1  # the state as stored
            taken = two.store.shift_lease(shift_id)
            assert taken is not None
            assert (taken.owner, taken.token) == (two.shifts.leases.replica_id, lease.token + 1)
            assert taken.next_checkpoint_at == due  # kept, not drawn anew
            await settle(clock, 48)
            speak(on_two)
            await settle(clock, 1)
            await asyncio.sleep(0.2)
            assert two.store.get_shift(shift_id).checkpoints_passed == 1  # not due yet
            await settle(clock, 1)
            passed = await next_kind(on_two)
            assert passed.kind is ShiftEventKind.CHECKPOINT_PASSED
            assert passed.shift.checkpoints_passed == 2
            after = two.store.shift_lease(shift_id)
            assert after is not None and after.checkpoint_seq == 2
            assert checkpoint_audits(two.store) == ["ACCEPT", "ACCEPT"]

    asyncio.run(scenario())


def test_a_checkpoint_that_fell_due_while_no_replica_held_the_stream_runs_on_the_next_speech(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            await one.stop()
            await settle(clock, 500)  # due at 100; the softphone was gone
            on_two = await two.shifts.attach(shift_id, PCM)
            await next_kind(on_two)
            speak(on_two)
            await settle(clock, 1)
            passed = await next_kind(on_two)
            assert passed.kind is ShiftEventKind.CHECKPOINT_PASSED
            lease = two.store.shift_lease(shift_id)
            assert lease is not None and lease.checkpoint_seq == 1

    asyncio.run(scenario())


def test_a_replica_that_lost_the_shift_cannot_write_it_and_its_stream_ends(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            stale = one.shifts._sessions[shift_id]  # the stale replica's view
            held = stale.lease
            await settle(clock, 99)
            # The softphone reconnected to replica two while replica one still streams (a
            # half-open connection), just before the checkpoint: replica one has not renewed
            # since, and both have audio when the checkpoint falls due.
            on_two = await two.shifts.attach(shift_id, PCM)
            await next_kind(on_two)
            speak(on_one)
            speak(on_two)
            await settle(clock, 1)
            assert (await next_kind(on_two)).kind is ShiftEventKind.CHECKPOINT_PASSED
            with pytest.raises(ShiftLeaseLostError):
                await eventually(on_one.next_event)
            assert shift_id not in one.shifts._sessions
            # Decided once: one checkpoint scored and stored, by the owner.
            assert checkpoint_audits(one.store) == ["ACCEPT"]
            assert one.store.get_shift(shift_id).checkpoints_passed == 1
            # And a write with the old token is refused whole, whatever it carries.
            record = one.store.get_shift(shift_id)
            assert held is not None
            with pytest.raises(ShiftLeaseLostError):
                await one.shifts.save(replace(record, state=ShiftState.LOCKED), lease=held)
            assert two.store.get_shift(shift_id).state is ShiftState.VERIFIED

    asyncio.run(scenario())


def test_a_checkpoint_decided_by_a_replica_that_lost_the_shift_meanwhile_leaves_no_audit(
    tmp_path: Path, database: str | Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica one confirms its lease, then the softphone moves to replica two while replica
    one scores: its decision takes no effect (the fenced save refuses it), so no audit record
    may claim it, and the chain stays whole."""

    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            confirm = one.shifts.leases.confirm
            moved: list[ShiftStream] = []

            async def confirmed_then_taken_over(session: LeasedSession) -> None:
                await confirm(session)
                if not moved:
                    moved.append(await two.shifts.attach(shift_id, PCM))

            monkeypatch.setattr(one.shifts.leases, "confirm", confirmed_then_taken_over)
            await settle(clock, 99)
            speak(on_one, level=-0.1)  # an impostor: replica one would lock-count a failure
            await settle(clock, 1)
            with pytest.raises(ShiftLeaseLostError):
                await eventually(on_one.next_event)
            assert moved, "replica one never reached its checkpoint"
            assert checkpoint_audits(one.store) == []
            stored = one.store.get_shift(shift_id)
            assert (stored.checkpoints_failed, stored.consecutive_failures) == (0, 0)
            # The owner's checkpoint is the one decided, and audited, once.
            on_two = moved[0]
            await next_kind(on_two)  # attached
            speak(on_two)
            await settle(clock, 1)
            assert (await next_kind(on_two)).kind is ShiftEventKind.CHECKPOINT_PASSED
            assert checkpoint_audits(two.store) == ["ACCEPT"]
            assert verify_log(two.store, [AUDIT_KEY]).intact

    asyncio.run(scenario())


def test_an_unlock_on_another_replica_leaves_the_stream_where_it_is(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            for _ in range(POLICY.max_consecutive_failures):
                await settle(clock, 99)
                speak(on_one, level=-0.1)  # an impostor speaks
                await settle(clock, 1)
                assert (await next_kind(on_one)).kind is ShiftEventKind.CHECKPOINT_FAILED
            assert (await next_kind(on_one)).kind is ShiftEventKind.SHIFT_LOCKED

            unlocked = await two.shifts.unlock(
                shift_id, "helpdesk checked the agent", by="helpdesk", role="admin"
            )
            assert unlocked.state is ShiftState.VERIFIED
            # Asked before it renews, replica one answers from the store, not its session.
            assert (await one.shifts.get(shift_id)).state is ShiftState.VERIFIED
            detached = two.store.shift_lease(shift_id)
            assert detached is not None and not detached.attached
            # Replica one, which holds the stream, takes the shift back when it renews, with
            # the state as stored, and its checkpoints go on.
            await settle(clock, POLICY.lease_seconds / 3)
            back = one.store.shift_lease(shift_id)
            assert back is not None
            assert (back.owner, back.attached) == (one.shifts.leases.replica_id, True)
            await settle(clock, 99)
            speak(on_one)
            await settle(clock, 1)
            passed = await next_kind(on_one)
            assert passed.kind is ShiftEventKind.CHECKPOINT_PASSED
            assert passed.shift.checkpoints_passed == 1

    asyncio.run(scenario())


def test_a_replica_that_cannot_reach_the_store_for_a_lease_ends_its_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path) as (one, _, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)

            def unreachable(*_: object) -> dict[str, object]:
                raise StorageError("cannot renew shift leases: connection refused")

            monkeypatch.setattr(one.store, "renew_shift_leases", unreachable)
            await settle(clock, POLICY.lease_seconds / 3)
            await settle(clock, POLICY.lease_seconds / 3)
            assert shift_id in one.shifts._sessions  # one failure is tolerated
            await settle(clock, POLICY.lease_seconds / 3)
            with pytest.raises(UnavailableError):
                await eventually(on_one.next_event)

    asyncio.run(scenario())


# --- events across replicas -----------------------------------------------------------------


async def kinds(subscription: EventSubscription, count: int) -> list[ShiftEventKind]:
    return [(await eventually(subscription.next_event)).kind for _ in range(count)]


def test_a_lock_decided_on_one_replica_reaches_a_subscriber_on_another(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, postgres_server.new_database()) as (one, two, clock):
            mfa = two.shifts.subscribe()
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            for _ in range(POLICY.max_consecutive_failures):
                await settle(clock, 99)
                speak(on_one, level=-0.1)
                await settle(clock, 1)
                await next_kind(on_one)
            assert await kinds(mfa, 3) == [
                ShiftEventKind.CHECKPOINT_FAILED,
                ShiftEventKind.CHECKPOINT_FAILED,
                ShiftEventKind.SHIFT_LOCKED,
            ]
            # The replica's own subscribers hear it through the same table, once.
            local = one.shifts.subscribe()
            await one.shifts.end(shift_id)
            assert await kinds(local, 1) == [ShiftEventKind.SHIFT_ENDED]
            assert await kinds(mfa, 1) == [ShiftEventKind.SHIFT_ENDED]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(local.next_event(), 0.5)

    asyncio.run(scenario())


def test_events_published_while_a_replica_was_not_listening_reach_it_in_order(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    async def scenario() -> None:
        database = postgres_server.new_database()
        async with two_replicas(tmp_path, database) as (one, two, _):
            mfa = two.shifts.subscribe()
            # Replica two's listening connection drops (as when PostgreSQL restarts): the
            # NOTIFYs of what follows never reach it.
            with postgres_server.admin() as admin:
                dropped = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%%' AND datname = %s",
                    (database.split("///")[1].split("?")[0],),
                ).fetchall()
            assert dropped
            shift_ids = [await started(one) for _ in range(3)]
            for shift_id in shift_ids:
                await one.shifts.end(shift_id)
            ended = [await eventually(mfa.next_event, 15) for _ in shift_ids]
            assert [e.kind for e in ended] == [ShiftEventKind.SHIFT_ENDED] * 3
            assert [e.shift.shift_id for e in ended] == shift_ids

    asyncio.run(scenario())


def test_an_event_commits_with_its_change_so_a_replica_dying_after_the_commit_loses_none(
    tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, postgres_server.new_database()) as (one, two, clock):
            mfa = two.shifts.subscribe()
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)

            def died(event: ShiftEvent, *, recorded: bool = False) -> None:
                """Replica one dies after each commit, before it announces anything."""

            monkeypatch.setattr(one.events, "publish", died)
            await settle(clock, 99)
            speak(on_one)
            await settle(clock, 1)
            assert (await next_kind(on_one)).kind is ShiftEventKind.CHECKPOINT_PASSED
            passed = await eventually(mfa.next_event)
            assert (passed.kind, passed.shift.checkpoints_passed) == (
                ShiftEventKind.CHECKPOINT_PASSED,
                1,
            )

    asyncio.run(scenario())


def test_a_shift_ended_on_another_replica_ends_its_stream_where_it_is(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path) as (one, two, clock):
            shift_id = await started(one)
            on_one = await one.shifts.attach(shift_id, PCM)
            await next_kind(on_one)
            ended = await two.shifts.end(shift_id)
            assert ended.state is ShiftState.ENDED
            await settle(clock, POLICY.lease_seconds / 3)  # replica one renews
            assert (await next_kind(on_one)).kind is ShiftEventKind.SHIFT_ENDED
            assert await eventually(on_one.next_event) is None  # ended normally
            assert shift_id not in one.shifts._sessions

    asyncio.run(scenario())


# --- resuming a subscription ----------------------------------------------------------------


def reported(agent_id: str, n: int, clock: ManualClock) -> ShiftEvent:
    """An event as a shift change announces it; `n` tells them apart (the failure count)."""
    now = clock.now()
    shift = ShiftRecord(f"shift-{n}", agent_id, "phone-1", ShiftState.VERIFIED, now, now, n)
    return ShiftEvent(ShiftEventKind.CHECKPOINT_FAILED, shift, now)


async def taken(
    subscription: EventSubscription, count: int, seconds: float = 60.0
) -> list[ShiftEvent]:
    """`count` events, each within 10 s and all within `seconds` (else an AssertionError that
    says how many came: events trickling in one per wait once took this test past pytest's
    timeout, which hid how far it had got)."""
    got: list[ShiftEvent] = []
    deadline = asyncio.get_running_loop().time() + seconds
    try:
        for _ in range(count):
            left = deadline - asyncio.get_running_loop().time()
            got.append(await eventually(subscription.next_event, max(0.0, min(10.0, left))))
    except TimeoutError:
        # Say how far it got: this test once timed out in a loaded full run, with no more said.
        ids = [event.event_id for event in got]
        raise AssertionError(f"{len(got)} of {count} events arrived (ids {ids})") from None
    return got


def test_a_subscriber_resumes_on_another_replica_with_every_event_once_in_order(
    tmp_path: Path, database: str | Path
) -> None:
    """The MFA provider's subscription on replica one drops after it received some events;
    events go on being produced (on both replicas, also while it resubscribes); it resumes
    on replica two after the last id it saw and gets each later event once, in order."""

    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            first = one.shifts.subscribe()
            for n in range(5):
                one.events.publish(reported(AGENT, n, clock))
            seen = await taken(first, 3)
            first.close()  # the connection drops; two events were on their way
            ids = [event.event_id for event in seen]
            assert ids == sorted(ids) and ids[0] > 0

            async def produce(start: int, count: int) -> None:
                for n in range(start, start + count):
                    (one if n % 2 else two).events.publish(reported(AGENT, n, clock))
                    await asyncio.sleep(0.002)

            await produce(5, 10)
            producing = asyncio.create_task(produce(15, 30))  # still going at the seam
            resumed = two.shifts.subscribe(after=ids[-1])
            seen += await taken(resumed, 42)
            await producing
            # Each once (two replicas publish at once: the store's order is their commits')
            assert sorted(e.shift.consecutive_failures for e in seen) == list(range(45))
            all_ids = [event.event_id for event in seen]
            assert all_ids == sorted(set(all_ids))  # in the store's order, no duplicate
            assert all_ids == [i for i, _ in two.store.events_after(0, 100)]  # no gap
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(resumed.next_event(), 0.5)
            one.events.publish(reported(AGENT, 45, clock))  # and it goes on live
            (live,) = await taken(resumed, 1)
            assert (live.shift.consecutive_failures, live.event_id > all_ids[-1]) == (45, True)

    asyncio.run(scenario())


def test_a_resumed_subscription_replays_only_the_agent_it_asked_for(
    tmp_path: Path, database: str | Path
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            other = "agent-8"
            one.store.create_agent(AgentRecord(other, "Agent 8", "HR-2", clock.now()))
            watch = two.shifts.subscribe()
            for n in range(6):
                one.events.publish(reported(AGENT if n % 2 else other, n, clock))
            before = await taken(watch, 6)
            mine = two.shifts.subscribe(AGENT, after=before[0].event_id - 1)
            got = await taken(mine, 3)
            assert [(e.shift.agent_id, e.shift.consecutive_failures) for e in got] == [
                (AGENT, 1),
                (AGENT, 3),
                (AGENT, 5),
            ]
            # Resuming after another agent's event (its id is only a place) shows none of it.
            after_other = two.shifts.subscribe(AGENT, after=before[3].event_id)
            assert [e.shift.consecutive_failures for e in await taken(after_other, 1)] == [5]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(after_other.next_event(), 0.5)

    asyncio.run(scenario())


def test_a_resume_from_an_id_never_given_or_no_longer_kept_is_refused(
    tmp_path: Path, database: str | Path
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            watch = two.shifts.subscribe()
            one.events.publish(reported(AGENT, 0, clock))
            (old,) = await taken(watch, 1)
            for hostile in (-1, -(2**63), old.event_id + 1, 2**63 - 1):
                with pytest.raises(InvalidRequestError) as refused:
                    await two.shifts.subscribe(after=hostile).next_event()
                assert refused.value.field == "after_event_id"
            clock.advance(RETENTION_SECONDS + 60)  # the retention drops the old event
            one.events.publish(reported(AGENT, 1, clock))
            (new,) = await taken(watch, 1)
            assert two.store.oldest_event_id() == new.event_id
            with pytest.raises(EventsExpiredError):
                await two.shifts.subscribe(after=old.event_id - 1).next_event()
            # Right after the dropped one is still exact: nothing after it was dropped.
            resumed = two.shifts.subscribe(after=old.event_id)
            assert (await taken(resumed, 1))[0].event_id == new.event_id

    asyncio.run(scenario())


def test_a_subscriber_that_falls_behind_reads_what_overflowed_from_the_store(
    tmp_path: Path, database: str | Path
) -> None:
    async def scenario() -> None:
        async with two_replicas(tmp_path, database) as (one, two, clock):
            slow = two.shifts.subscribe()
            watch = two.shifts.subscribe()
            count = 300  # more than a subscriber's buffer holds
            for n in range(count):
                one.events.publish(reported(AGENT, n, clock))
            await taken(watch, count)  # all delivered: the slow one's buffer overflowed
            got = await taken(slow, count)
            assert [e.shift.consecutive_failures for e in got] == list(range(count))

    asyncio.run(scenario())


def test_a_replayed_event_says_what_the_live_one_said() -> None:
    """A resumed subscriber reads events back from the store: what triggered a checkpoint
    survives the stored form (it did not, before events were replayed)."""
    clock = ManualClock()
    event = replace(
        reported(AGENT, 1, clock),
        trigger=CheckpointTrigger.CHANGE_WATCH,
        change_similarity=0.21,
        scheduled_at=clock.now(),
    )
    assert decode_event(encode_event(event)) == event


def test_the_event_listener_outlives_an_error_that_is_not_the_databases(
    postgres_server: PostgresServer,
) -> None:
    """A replica's LISTEN thread that died on an unexpected error would leave it deaf to the
    other replicas' events (heard only at the bus's slow poll) without a word: it logs the
    error and listens again."""
    from server.storage.postgresql.backend import EVENTS_CHANNEL
    from server.storage.postgresql.notify import PostgresEventWakeups

    location = postgres_server.new_database()
    calls: list[float] = []
    woke_again = threading.Event()

    def woken() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("a bug in the bus's wake-up")
        woke_again.set()

    wakeups = PostgresEventWakeups(location)
    try:
        wakeups.start(woken)
        assert woke_again.wait(10), "the listener did not come back after the error"
        woke_again.clear()
        with psycopg.connect(location, autocommit=True) as conn:
            conn.execute(f"NOTIFY {EVENTS_CHANNEL}")
        assert woke_again.wait(10), "a notification after the error was not heard"
    finally:
        wakeups.close()
