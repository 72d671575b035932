"""How shift events reach the MFA provider's subscription (SubscribeShiftEvents) whichever
replica it is connected to.

One process on SQLite delivers in process (LocalEventBus). Replicas sharing PostgreSQL go
through the store (StoreEventBus): a replica appends each event to the events table, sealed
under the agent's key, and every replica (itself included) reads the table by id, in order,
when woken (PostgreSQL NOTIFY, announced only when the event commits) and at least every few
seconds in any case. A wake-up is only a hint: a replica that missed some (its listening
connection dropped, PostgreSQL restarted) catches up by id from the last event it delivered,
so a lock decided on one replica reaches a subscriber on any other, or the replica reports
that it cannot reach the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol

from server.errors import NotFoundError, VoxauthError
from server.pipeline.presentation import PresentationAssessment, PresentationDecision
from server.records import ShiftRecord, ShiftState
from server.runtime.clock import Clock
from server.runtime.store_pool import StorePool
from server.scoring.calibration import DecidedBy
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

    async def close(self) -> None: ...


class LocalEventBus:
    """One process: an event goes straight to this process's subscribers."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None

    async def open(self) -> None:
        return None

    def listen(self, deliver: Deliver) -> None:
        self._deliver = deliver

    def record(self, unit: UnitOfWork, event: ShiftEvent) -> None:
        return None  # One process: nothing to keep for another.

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        if self._deliver is not None:
            self._deliver(event)

    async def close(self) -> None:
        return None


_PAGE = 500
_POLL_SECONDS = 5.0
"""At least this often the table is read, woken or not: a lost wake-up delays, never loses."""
_RETRY_SECONDS = 1.0
_PENDING_LIMIT = 10_000
"""Events waiting to be stored while the store is unreachable; beyond, the oldest are dropped
(they are in the audit log and the shift state)."""
KEEP_EVENTS_SECONDS = 3600.0
"""How long the events table keeps an event: a replica that was cut off for less catches up
on everything; after more, it starts from the newest."""


class StoreEventBus:
    """Replicas on one store: events go through its events table (see the module's doc)."""

    def __init__(
        self, store: EventStore, store_pool: StorePool, wakeups: EventWakeups, clock: Clock
    ) -> None:
        self._store = store
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
            now - timedelta(seconds=KEEP_EVENTS_SECONDS),
        )

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        if recorded:
            self._to_read.set()  # Stored with its change: read it back without waiting.
            return
        if len(self._pending) == self._pending.maxlen:
            log.warning("event bus: store unreachable, dropping the oldest pending event")
        self._pending.append(event)
        self._to_write.set()

    async def close(self) -> None:
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
                keep_after = now - timedelta(seconds=KEEP_EVENTS_SECONDS)
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
                try:
                    event = decode_event(payload)
                except (ValueError, KeyError, TypeError) as error:
                    log.error("event bus: event %d is unreadable (%s); skipped", event_id, error)
                    continue
                if self._deliver is not None:
                    self._deliver(event)
            if len(page) < _PAGE:
                return


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
    )


def _time(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse_time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
