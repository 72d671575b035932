"""How shift events reach the MFA provider's subscription (SubscribeShiftEvents) whichever
replica it is connected to, and how a subscriber resumes after a drop without losing any.

Every event goes through the store's events table (StoreEventBus): a replica appends each
event, sealed under the agent's key, and every replica (itself included) reads the table by
id, in order, when woken (PostgreSQL NOTIFY, announced only when the event commits; in one
process on SQLite, by its own writes) and at least every few seconds in any case. A wake-up is
only a hint: a replica that missed some (its listening connection dropped, PostgreSQL
restarted) catches up by id from the last event it delivered, so a lock decided on one
replica reaches a subscriber on any other, or the replica reports that it cannot reach the
store.

The id is the event's place in one total order, the same on every replica: ids are given in
commit order (every write holds the store's writer lock to its commit) and never twice. A
subscriber that kept the id of the last event it received resumes after it on any replica
(`replay`), as long as the table still holds what followed it (`retention_seconds`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from server.errors import EventsExpiredError, InvalidRequestError, NotFoundError, VoxauthError
from server.pipeline.presentation import PresentationAssessment, PresentationDecision
from server.records import ShiftRecord, ShiftState
from server.runtime.clock import Clock
from server.runtime.store_pool import StorePool
from server.scoring.calibration import DecidedBy
from server.shifts.change_watch import CheckpointTrigger
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.storage.interface import EventStore, EventWakeups, UnitOfWork

log = logging.getLogger(__name__)

Deliver = Callable[[ShiftEvent], None]


class EventBus(Protocol):
    async def open(self) -> None:
        """Starts delivering: events published from now on reach `listen`'s callback."""

    def listen(self, deliver: Deliver) -> None:
        """Where this replica's events go (the ShiftService's fan-out to its subscribers)."""

    def record(self, unit: UnitOfWork, event: ShiftEvent) -> None:
        """Keeps `event` in the unit of work that stores the change it reports, so it is
        announced if and only if the change commits, whatever happens to this replica after
        the commit. Publish it with `recorded=True` once the unit has committed."""

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        """Announces an event whose change has committed, to the subscribers of every
        replica (`recorded`: kept by `record` already). Does not wait."""

    async def check_resumable(self, after_id: int) -> None:
        """Raises InvalidRequestError for an id no event was ever given (negative, or beyond
        the newest), EventsExpiredError when events that followed it may be gone already
        (older than the retention)."""

    async def replay(self, after_id: int, limit: int) -> list[ShiftEvent]:
        """At most `limit` events after `after_id`, in id order, each with its event_id (an
        unreadable one is skipped, its id passed over); fewer than `limit`: the newest."""

    async def close(self) -> None: ...


_PAGE = 500
_POLL_SECONDS = 5.0
"""At least this often the table is read, woken or not: a lost wake-up delays, never loses."""
_RETRY_SECONDS = 1.0
_PENDING_LIMIT = 10_000
"""Events waiting to be stored while the store is unreachable; beyond, the oldest are dropped
(they are in the audit log and the shift state)."""


class StoreEventBus:
    """Events through the store's events table (see the module's doc). `wakeups`: how other
    replicas' events are announced (None: one process, which writes every event itself).
    `retention_seconds`: how long the table keeps an event (RetentionPolicy); a replica or a
    subscriber that was cut off for less catches up on everything."""

    def __init__(
        self,
        store: EventStore,
        store_pool: StorePool,
        wakeups: EventWakeups | None,
        clock: Clock,
        retention_seconds: float,
    ) -> None:
        self._store = store
        self._retention = timedelta(seconds=retention_seconds)
        self._store_pool = store_pool
        self._wakeups = wakeups
        self._clock = clock
        self._deliver: Deliver | None = None
        self._pending: deque[ShiftEvent] = deque(maxlen=_PENDING_LIMIT)
        self._to_write = asyncio.Event()
        self._to_read = asyncio.Event()
        self._last_id = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        store = self._store
        # From now on, as a subscription is: what committed before is not replayed.
        self._last_id = await self._store_pool.run(store.latest_event_id)
        loop = asyncio.get_running_loop()

        def woken() -> None:
            loop.call_soon_threadsafe(self._to_read.set)

        if self._wakeups is not None:
            self._wakeups.start(woken)
        self._tasks = [
            asyncio.create_task(self._write(), name="event-bus-write"),
            asyncio.create_task(self._read(), name="event-bus-read"),
        ]

    def listen(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def record(self, unit: UnitOfWork, event: ShiftEvent) -> None:
        now = self._clock.now()
        unit.append_event(
            event.shift.agent_id,
            encode_event(event),
            now,
            now - self._retention,
        )

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        if recorded:
            self._to_read.set()  # Stored with its change: read it back without waiting.
            return
        if len(self._pending) == self._pending.maxlen:
            log.warning("event bus: store unreachable, dropping the oldest pending event")
        self._pending.append(event)
        self._to_write.set()

    async def check_resumable(self, after_id: int) -> None:
        if after_id < 0:
            raise InvalidRequestError(
                f"after_event_id {after_id} is negative; event ids start at 1",
                field="after_event_id",
            )
        store = self._store

        def bounds() -> tuple[int | None, int]:
            # The newest first: it waits for a write in progress (see latest_event_id), so the
            # oldest, read after, sees that write's event. The other way round an empty table's
            # first event, committing in between, read as "none kept" with an id given, and a
            # subscriber resuming from the start was refused as expired.
            latest = store.latest_event_id()
            return store.oldest_event_id(), latest

        oldest, latest = await self._store_pool.run(bounds)
        if after_id > latest:
            raise InvalidRequestError(
                f"after_event_id {after_id} is beyond the newest event ({latest}): not an id "
                "this service gave",
                field="after_event_id",
            )
        # Ids run without gaps but for writes rolled back, so an id before the oldest kept
        # (or, with none kept, before the newest given) may have had successors dropped.
        first_kept = latest + 1 if oldest is None else oldest
        if after_id < first_kept - 1:
            raise EventsExpiredError(
                f"the events after {after_id} are no longer kept (events are kept for "
                f"{self._retention.total_seconds():.0f} s): read the shifts' state "
                "(GetShift, ListShifts) and subscribe again without after_event_id",
                field="after_event_id",
            )

    async def replay(self, after_id: int, limit: int) -> list[ShiftEvent]:
        store = self._store
        page = await self._store_pool.run(partial(store.events_after, after_id, limit))
        return [event for event in (_read(i, payload) for i, payload in page) if event]

    async def close(self) -> None:
        if self._wakeups is not None:
            self._wakeups.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _write(self) -> None:
        store = self._store
        while True:
            await self._to_write.wait()
            self._to_write.clear()
            while self._pending:
                event = self._pending[0]
                payload = encode_event(event)
                now = self._clock.now()
                keep_after = now - self._retention
                agent_id = event.shift.agent_id
                try:
                    await self._store_pool.run(
                        partial(store.append_event, agent_id, payload, now, keep_after)
                    )
                except NotFoundError:
                    self._pending.popleft()  # The agent was erased meanwhile.
                    continue
                except VoxauthError as error:
                    # The store is unreachable: keep the event and try again.
                    log.warning("event bus: cannot store an event (%s); retrying", error.message)
                    await asyncio.sleep(_RETRY_SECONDS)
                    continue
                self._pending.popleft()
                self._to_read.set()  # No need to wait for our own NOTIFY.

    async def _read(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._to_read.wait(), _POLL_SECONDS)
            self._to_read.clear()
            try:
                await self._catch_up()
            except VoxauthError as error:
                log.warning("event bus: cannot read events (%s); retrying", error.message)
                await asyncio.sleep(_RETRY_SECONDS)
                self._to_read.set()

    async def _catch_up(self) -> None:
        store = self._store
        while True:
            after = self._last_id
            page = await self._store_pool.run(partial(store.events_after, after, _PAGE))
            for event_id, payload in page:
                self._last_id = event_id
                event = _read(event_id, payload)
                if event is not None and self._deliver is not None:
                    self._deliver(event)
            if len(page) < _PAGE:
                return


def _read(event_id: int, payload: bytes) -> ShiftEvent | None:
    try:
        return replace(decode_event(payload), event_id=event_id)
    except (ValueError, KeyError, TypeError) as error:
        log.error("event bus: event %d is unreadable (%s); skipped", event_id, error)
        return None


# --- the stored form of an event ----------------------------------------------------------


def encode_event(event: ShiftEvent) -> bytes:
    shift = event.shift
    presentation = event.presentation
    document: dict[str, Any] = {
        "kind": event.kind.value,
        "shift": {
            "shift_id": shift.shift_id,
            "agent_id": shift.agent_id,
            "device_id": shift.device_id,
            "state": shift.state.value,
            "started_at": shift.started_at.isoformat(),
            "updated_at": shift.updated_at.isoformat(),
            "consecutive_failures": shift.consecutive_failures,
            "checkpoints_passed": shift.checkpoints_passed,
            "checkpoints_failed": shift.checkpoints_failed,
            "checkpoints_insufficient": shift.checkpoints_insufficient,
            "ended_at": _time(shift.ended_at),
        },
        "at": event.at.isoformat(),
        "scheduled_at": _time(event.scheduled_at),
        "score": event.score,
        "threshold": event.threshold,
        "net_speech_seconds": event.net_speech_seconds,
        "audio_start": _time(event.audio_start),
        "audio_end": _time(event.audio_end),
        "decided_by": event.decided_by.value if event.decided_by else None,
        "presentation": None
        if presentation is None
        else {
            "score": presentation.score,
            "threshold": presentation.threshold,
            "decision": presentation.decision.value,
            "enforced": presentation.enforced,
        },
        "trigger": event.trigger.value if event.trigger else None,
        "change_similarity": event.change_similarity,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode_event(payload: bytes) -> ShiftEvent:
    """Raises ValueError, KeyError or TypeError for a payload that is not an event."""
    document = json.loads(payload)
    shift = document["shift"]
    presentation = document["presentation"]
    return ShiftEvent(
        kind=ShiftEventKind(document["kind"]),
        shift=ShiftRecord(
            shift_id=str(shift["shift_id"]),
            agent_id=str(shift["agent_id"]),
            device_id=str(shift["device_id"]),
            state=ShiftState(shift["state"]),
            started_at=datetime.fromisoformat(shift["started_at"]),
            updated_at=datetime.fromisoformat(shift["updated_at"]),
            consecutive_failures=int(shift["consecutive_failures"]),
            checkpoints_passed=int(shift["checkpoints_passed"]),
            checkpoints_failed=int(shift["checkpoints_failed"]),
            checkpoints_insufficient=int(shift["checkpoints_insufficient"]),
            ended_at=_parse_time(shift["ended_at"]),
        ),
        at=datetime.fromisoformat(document["at"]),
        scheduled_at=_parse_time(document["scheduled_at"]),
        score=float(document["score"]),
        threshold=float(document["threshold"]),
        net_speech_seconds=float(document["net_speech_seconds"]),
        audio_start=_parse_time(document["audio_start"]),
        audio_end=_parse_time(document["audio_end"]),
        decided_by=DecidedBy(document["decided_by"]) if document["decided_by"] else None,
        presentation=None
        if presentation is None
        else PresentationAssessment(
            float(presentation["score"]),
            float(presentation["threshold"]),
            PresentationDecision(presentation["decision"]),
            bool(presentation["enforced"]),
        ),
        # Absent from events stored before they were kept.
        trigger=CheckpointTrigger(document["trigger"]) if document.get("trigger") else None,
        change_similarity=float(document.get("change_similarity", 0.0)),
    )


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
