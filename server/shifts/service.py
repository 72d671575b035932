"""Shifts: a login check when the shift starts, then checkpoints at random times that verify
the agent's most recent speech from the softphone's stream. Consecutive failed checkpoints lock
the shift until a login check passes.

Shift state lives in the store (it survives restarts); audio lives only in each active shift's
bounded in-memory buffer. All timing goes through one Clock.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import secrets
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from enrollment.passive import PassiveEnrollment
from models.embedder import Embedding
from server.audit_actions import AuditAction
from server.config import ShiftPolicy
from server.errors import (
    CapacityError,
    InvalidRequestError,
    ShiftEndedError,
    ShiftLeaseLostError,
    ShiftNotLockedError,
    ShiftTakenOverError,
    StorageError,
    StreamOrderError,
    VoxauthError,
)
from server.pipeline.analysis import AudioInput, VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.decode import TARGET_RATE
from server.pipeline.speech import SpeechDetector
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.runtime.log_format import logged_agent
from server.runtime.store_pool import StorePool
from server.runtime.telemetry import NO_TELEMETRY, LookOutcome, Telemetry
from server.security.assurance_desk import AssuranceDesk
from server.shifts import passive as passive_shift
from server.shifts.buffer import FRAME_SECONDS, RecentSpeech, ShiftAudioBuffer, StreamFormat
from server.shifts.change_watch import SCHEDULED, Cause, ChangeWatch, CheckpointTrigger
from server.shifts.event_bus import EventBus
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.lease import ShiftLeases
from server.shifts.schedule import CheckpointSchedule
from server.storage.interface import (
    AssuranceRecord,
    AuditEvent,
    RevocationReason,
    ShiftCursor,
    ShiftLease,
    ShiftRecord,
    ShiftState,
    Store,
    Voiceprint,
)
from server.validation import validate_agent_id, validate_shift_id
from server.verification.decision import Decision
from server.verification.service import VerificationResult, VerificationService

log = logging.getLogger(__name__)

# Live events held for one MFA subscriber that is not reading (see SubscribeShiftEvents);
# beyond, it reads them back from the store.
_SUBSCRIBER_EVENTS = 256
_REPLAY_PAGE = 200
"""Stored events read at a time for a subscriber that resumes or fell behind."""
_STORE_RETRY_SECONDS = 2.0
"""How long a due checkpoint waits before trying again when the store did not answer."""
_DEVICE_ID = re.compile(r"[A-Za-z0-9._@:-]{1,128}")


class ShiftStream:
    """One attached softphone stream: audio in, events out (bounded; oldest dropped)."""

    def __init__(self, session: ShiftSession, max_events: int) -> None:
        self._session = session
        self._events: deque[ShiftEvent | BaseException | None] = deque(maxlen=max_events)
        self._ready = asyncio.Event()

    def push(self, frames: bytes) -> None:
        """Adds audio frames; raises InvalidAudioError for frames of the wrong size."""
        self._session.receive(self, frames)

    def deliver(self, event: ShiftEvent) -> None:
        self._events.append(event)
        self._ready.set()

    def close(self, error: BaseException | None = None) -> None:
        """Ends the event stream, with an error to report or None for a normal end."""
        self._events.append(error)
        self._ready.set()

    async def next_event(self) -> ShiftEvent | None:
        """The next event; None when the stream has ended. Raises the error it ended with."""
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        item = self._events.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    def detach(self) -> None:
        self._session.detach(self)


class EventSubscription:
    """A listener to every shift's events (the MFA provider's), or one agent's, in the store's
    order of events. Bounded: live events wait in a buffer of `max_events`; when a subscriber
    that does not keep up overflows it, the subscription reads what it missed back from the
    store (a page at a time) rather than losing it, and so does one that resumes `after` an
    event it received before (on this replica or another).

    The seam between the store and the live stream has no gap and no duplicate: the live
    buffer is filled from the moment of subscribing, the replay reads the store from `after`
    until it has nothing newer, and then live events up to the last one replayed are dropped.
    No gap because ids are given in commit order and the bus delivers each replica-wide in id
    order: whatever the replay's last read did not see is delivered live after it."""

    def __init__(
        self,
        service: ShiftService,
        bus: EventBus,
        agent_id: str,
        after: int | None,
        max_events: int,
    ) -> None:
        self._service = service
        self._bus = bus
        self._agent_id = agent_id
        self._events: deque[ShiftEvent] = deque(maxlen=max_events)
        self._ready = asyncio.Event()
        self._missed_from: int | None = None
        """The id of the oldest live event the full buffer dropped, until it is replayed."""
        self._position = after
        """The id of the last event handed out or queued in _replayed, or resumed after; None:
        live from the first event on."""
        self._checked = after is None
        self._replaying = after is not None
        self._replayed: deque[ShiftEvent] = deque()
        """A page read back from the store, not yet handed out."""

    def offer(self, event: ShiftEvent) -> None:
        if not self._visible(event):
            return
        if len(self._events) == self._events.maxlen and self._missed_from is None:
            self._missed_from = self._events[0].event_id
        self._events.append(event)
        self._ready.set()

    async def next_event(self) -> ShiftEvent:
        """The next event. The first call raises InvalidRequestError or EventsExpiredError
        for an `after` the store cannot resume from. Safe to cancel: nothing is lost."""
        if not self._checked:
            assert self._position is not None
            await self._bus.check_resumable(self._position)
            self._checked = True
        while True:
            if self._replayed:
                return self._replayed.popleft()
            if self._replaying:
                assert self._position is not None
                page = await self._bus.replay(self._position, _REPLAY_PAGE)
                if page:
                    self._position = page[-1].event_id
                self._replayed.extend(event for event in page if self._visible(event))
                self._replaying = len(page) == _REPLAY_PAGE
                continue
            while not self._events:
                self._ready.clear()
                await self._ready.wait()
            if self._missed_from is not None:
                # Overflowed: what the buffer dropped is in the store; read it from there.
                if self._position is None:
                    self._position = self._missed_from - 1
                self._missed_from = None
                self._replaying = True
                continue
            event = self._events.popleft()
            if self._position is not None and event.event_id <= self._position:
                continue  # Replayed already.
            self._position = event.event_id
            return event

    def close(self) -> None:
        self._service.unsubscribe(self)

    def _visible(self, event: ShiftEvent) -> bool:
        return not self._agent_id or event.shift.agent_id == self._agent_id


class ShiftSession:
    """An active shift in memory: its audio buffer, its checkpoint task, its stream."""

    def __init__(self, service: ShiftService, record: ShiftRecord) -> None:
        self.record = record
        self._service = service
        self.buffer: ShiftAudioBuffer | None = None
        self.stream: ShiftStream | None = None
        self._audio_arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.detached_since: float | None = service.clock.monotonic()
        self.lease: ShiftLease | None = None
        """This replica's lease of the shift (server/shifts/lease.py); every write carries it."""
        self.watch = ChangeWatch(service.policy, service.embedder)
        self._watching: asyncio.Task[None] | None = None
        self._checking = False
        self._pending: Cause | None = None
        self._triggered = asyncio.Event()

    # --- stream -------------------------------------------------------------------------

    def attach(self, stream_format: StreamFormat) -> ShiftStream:
        if self.stream is not None:
            self.stream.close(ShiftTakenOverError("a newer stream took over this shift"))
        if self.buffer is None or self.buffer.format != stream_format:
            self.buffer = ShiftAudioBuffer(
                stream_format, self._service.policy.max_audio_age_seconds
            )
        self.stream = ShiftStream(self, self._service.policy.max_pending_events)
        self.detached_since = None
        self.watch.restart()
        self.stream.deliver(
            ShiftEvent(ShiftEventKind.STREAM_ATTACHED, self.record, self._service.clock.now())
        )
        self.ensure_checkpoints()
        return self.stream

    def detach(self, stream: ShiftStream) -> None:
        if self.stream is stream:
            self.stream = None
            self.detached_since = self._service.clock.monotonic()

    def receive(self, stream: ShiftStream, frames: bytes) -> None:
        if stream is not self.stream or self.buffer is None:
            raise StreamOrderError("this stream no longer owns the shift")
        self.buffer.append(frames, self._service.clock.monotonic())
        if self.buffer.seconds_since_mark >= self._service.policy.speech_recheck_seconds:
            self._audio_arrived.set()
        heard = self.buffer.format.frame_count(frames) * FRAME_SECONDS
        if (
            self.watch.heard(heard)
            and self.record.state is ShiftState.VERIFIED
            and not self._checking
            and (self._watching is None or self._watching.done())
        ):
            self._watching = asyncio.create_task(
                self._look(), name=f"shift-watch-{self.record.shift_id}"
            )

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        """To the stream and every subscriber; `recorded`: the event was stored with its
        change (ShiftService.save's `events`)."""
        if self.stream is not None:
            self.stream.deliver(event)
        self._service.publish(event, recorded=recorded)

    # --- checkpoints ----------------------------------------------------------------------

    @property
    def audio_arrived(self) -> asyncio.Event:
        """Set when enough new audio arrived to look for speech again."""
        return self._audio_arrived

    def ensure_checkpoints(self) -> None:
        """Runs the checkpoint loop while the shift is VERIFIED (the passive enrollment's
        collection while it is NOT_ENROLLED)."""
        if self._task is not None and not self._task.done():
            return
        if self.record.state is ShiftState.VERIFIED:
            self._task = asyncio.create_task(
                self._checkpoints(), name=f"shift-{self.record.shift_id}"
            )
        elif self.record.state is ShiftState.NOT_ENROLLED and self._service.passive is not None:
            self._task = asyncio.create_task(
                passive_shift.collect(self._service, self, self._service.passive),
                name=f"shift-{self.record.shift_id}-enrollment",
            )

    def stop(self, error: BaseException | None = None) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._watching is not None:
            self._watching.cancel()
        if self.stream is not None:
            self.stream.close(error)
            self.stream = None

    # --- the lease (server/shifts/lease.py) ----------------------------------------------

    @property
    def streaming(self) -> bool:
        return self.stream is not None

    def retaken(self) -> None:
        if self.record.state is ShiftState.ENDED:
            # Ended on another replica: the stream hears it, as it would here.
            if self.stream is not None:
                self.stream.deliver(
                    ShiftEvent(ShiftEventKind.SHIFT_ENDED, self.record, self.record.updated_at)
                )
            self._service.forget(self)
            self.stop()
            return
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()  # Its wait was for the schedule as it was; the stored one rules.
            self._task = None
        self.ensure_checkpoints()

    def lost(self, error: VoxauthError) -> None:
        self._service.forget(self)
        self.stop(error)

    async def _checkpoints(self) -> None:
        service = self._service
        try:
            while self.record.state is ShiftState.VERIFIED:
                try:
                    due = await service.leases.next_due(self)
                    # Triggered checkpoints run in between; the random one stays where it
                    # fell (in the lease, so a failover keeps it too).
                    while (cause := await self._next_trigger(due)) is not None:
                        if cause.since is not None and self.buffer is not None:
                            self.buffer.discard_before(cause.since)
                        await self._checkpoint(service.clock.monotonic(), cause)
                        if self.record.state is not ShiftState.VERIFIED:
                            return
                    if self.record.state is not ShiftState.VERIFIED:
                        return  # Locked meanwhile (a second voice, by policy).
                    await self._checkpoint(due, SCHEDULED)
                except ShiftLeaseLostError:
                    # Nothing of the checkpoint was stored: the owner now runs it, or this
                    # replica does once it takes the lease back.
                    if not await service.leases.recover_stored(self):
                        return
                except StorageError as error:
                    # The store is unreachable (a shared database restarting): nothing of the
                    # checkpoint was stored, so it stays due and runs once the store answers.
                    log.warning(
                        "shift %s checkpoint waits: %s", self.record.shift_id, error.message
                    )
                    await service.clock.sleep_until(
                        service.clock.monotonic() + _STORE_RETRY_SECONDS
                    )
        except asyncio.CancelledError:
            raise
        except VoxauthError as error:
            # The agent was erased or re-enrolled with another model mid-shift: nothing
            # left to verify against, so the shift ends.
            log.warning("shift %s ends: %s", self.record.shift_id, error.message)
            await service.end(self.record.shift_id, reason=error.message)

    def trigger(self, cause: Cause) -> None:
        """Starts a checkpoint now, unless one is already running: that one judges the
        newest speech anyway."""
        if not self._checking and self._pending is None:
            self._pending = cause
            self._triggered.set()

    async def _next_trigger(self, due: float) -> Cause | None:
        """The next triggered checkpoint before `due`; None once `due` has come."""
        clock = self._service.clock
        while self._pending is None and clock.monotonic() < due:
            self._triggered.clear()
            triggered = asyncio.ensure_future(self._triggered.wait())
            timeout = asyncio.ensure_future(clock.sleep_until(due))
            try:
                await asyncio.wait({triggered, timeout}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                triggered.cancel()
                timeout.cancel()
        pending, self._pending = self._pending, None
        return pending

    async def _look(self) -> None:
        """The change watch's looks while one is due (audio may have come in a burst); a
        suspected change triggers a checkpoint."""
        service = self._service
        while (
            self.watch.due
            and self.buffer is not None
            and self.record.state is ShiftState.VERIFIED
            and not self._checking
        ):
            self.watch.begin()
            try:
                look = await service.pool.run(
                    functools.partial(
                        self.watch.look,
                        self.buffer,
                        functools.partial(service.voiceprint_of, self.record.agent_id),
                    )
                )
            except CapacityError:
                # Busy: the next look comes with the next interval of audio.
                service.telemetry.change_watch_looked(LookOutcome.SKIPPED_BUSY)
                return
            except VoxauthError as error:
                service.telemetry.change_watch_looked(LookOutcome.FAILED)
                log.warning("shift %s: change watch: %s", self.record.shift_id, error.message)
                return
            service.telemetry.change_watch_looked(
                LookOutcome.TOO_LITTLE_SPEECH if look is None else LookOutcome.COMPARED
            )
            second = self.watch.record(look)
            if self.record.state is not ShiftState.VERIFIED or look is None:
                continue
            if look.suspected:
                await service.save(
                    self.record,
                    service.audit_event(
                        AuditAction.SHIFT_VOICE_CHANGE,
                        self.record,
                        "SUSPECTED",
                        similarity=round(look.similarity, 4),
                        threshold=service.policy.change_watch_threshold,
                    ),
                    lease=self.lease,
                )
                self.trigger(Cause(CheckpointTrigger.CHANGE_WATCH, look.start, look.similarity))
            if second is not None:
                await self._second_voice(second.start, second.end, second.similarity)

    async def _second_voice(self, start: float, end: float, similarity: float) -> None:
        service = self._service
        record = self.record
        locks = service.policy.second_voice_locks
        if locks:
            record = replace(record, state=ShiftState.LOCKED, updated_at=service.clock.now())
        audit = service.audit_event(
            AuditAction.SHIFT_SECOND_VOICE,
            record,
            "LOCKED" if locks else "REPORTED",
            similarity=round(similarity, 4),
            threshold=service.policy.change_watch_threshold,
            seconds=round(end - start, 1),
        )
        events = [
            ShiftEvent(
                ShiftEventKind.SECOND_VOICE,
                record,
                service.clock.now(),
                score=similarity,
                threshold=service.policy.change_watch_threshold,
                audio_start=service.wall_time(start),
                audio_end=service.wall_time(end),
            )
        ]
        if locks:
            events.append(ShiftEvent(ShiftEventKind.SHIFT_LOCKED, record, record.updated_at))
        # A lock by policy ends the random schedule as a checkpoint's lock does.
        lease = (
            replace(self.lease, next_checkpoint_at=None)
            if locks and self.lease is not None
            else self.lease
        )
        await service.save(
            record,
            audit,
            revoking=RevocationReason.SHIFT_LOCKED if locks else None,
            lease=lease,
            events=events,
        )
        self.record, self.lease = record, lease
        for event in events:
            self.publish(event, recorded=True)

    async def _checkpoint(self, due: float, cause: Cause) -> None:
        self._checking = True
        try:
            await self._checkpoint_on_speech(due, cause)
        finally:
            self._checking = False

    async def _checkpoint_on_speech(self, due: float, cause: Cause) -> None:
        service = self._service
        policy = service.policy
        scheduled_at = service.clock.now() - timedelta(seconds=service.clock.monotonic() - due)
        deadline = due + policy.speech_wait_seconds
        while True:
            if self.buffer is not None:
                self.buffer.mark()
                self._audio_arrived.clear()
                await service.leases.confirm(self)
                try:
                    outcome = await service.pool.run(
                        lambda: service.check_speech(self, cause.trigger)
                    )
                except CapacityError:
                    outcome = None  # Busy: look again when more audio arrives.
                    service.telemetry.checkpoint_deferred_busy()
                if outcome is not None:
                    await self._decided(outcome, scheduled_at, cause)
                    return
            if service.clock.monotonic() >= deadline:
                await self._insufficient(scheduled_at, cause)
                return
            arrived = asyncio.ensure_future(self._audio_arrived.wait())
            timeout = asyncio.ensure_future(service.clock.sleep_until(deadline))
            try:
                await asyncio.wait({arrived, timeout}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                arrived.cancel()
                timeout.cancel()

    async def _decided(self, outcome: CheckedSpeech, scheduled_at: datetime, cause: Cause) -> None:
        service = self._service
        result, recent, embedding = outcome.result, outcome.recent, outcome.embedding
        assert self.buffer is not None
        self.buffer.clear()  # Used audio is not kept.
        passed = result.decision is Decision.ACCEPT
        if passed:
            self.watch.passed(embedding)
        record = self.record
        record = replace(
            record,
            consecutive_failures=0 if passed else record.consecutive_failures + 1,
            checkpoints_passed=record.checkpoints_passed + passed,
            checkpoints_failed=record.checkpoints_failed + (not passed),
            updated_at=service.clock.now(),
        )
        locked = record.consecutive_failures >= service.policy.max_consecutive_failures
        decided = service.leases.decided(
            self.lease,
            verified=not locked,
            scheduled=cause.trigger is CheckpointTrigger.SCHEDULED,
        )
        if locked:
            record = replace(record, state=ShiftState.LOCKED)
            lock = service.audit_event(
                AuditAction.SHIFT_LOCK,
                record,
                "LOCKED",
                consecutive_failures=record.consecutive_failures,
            )
        kind = ShiftEventKind.CHECKPOINT_PASSED if passed else ShiftEventKind.CHECKPOINT_FAILED
        events = [
            ShiftEvent(
                kind,
                record,
                record.updated_at,
                scheduled_at=scheduled_at,
                score=result.score,
                threshold=result.threshold,
                net_speech_seconds=recent.net_seconds,
                audio_start=service.wall_time(recent.start),
                audio_end=service.wall_time(recent.end),
                decided_by=result.scoring.decided_by if result.scoring else None,
                presentation=result.presentation,
                trigger=cause.trigger,
                change_similarity=cause.similarity,
            )
        ]
        if locked:
            events.append(ShiftEvent(ShiftEventKind.SHIFT_LOCKED, record, record.updated_at))
            await service.save(
                record,
                *outcome.audit,
                lock,
                revoking=RevocationReason.SHIFT_LOCKED,
                lease=decided,
                events=events,
            )
        else:
            await service.save(record, *outcome.audit, lease=decided, events=events)
        self.record, self.lease = record, decided
        for event in events:
            self.publish(event, recorded=True)
        if not passed and not locked and cause.trigger is not CheckpointTrigger.SCHEDULED:
            # The watch heard another voice and the checkpoint agreed: the next check need
            # not wait for the random time. A random checkpoint's failure alone does not
            # hurry the next (the agent's own failures come in runs: measured, README "Change
            # of voice"); the watch keeps listening. (Set directly: this one is still running.)
            self._pending = Cause(CheckpointTrigger.FOLLOW_UP)
            self._triggered.set()

    async def _insufficient(self, scheduled_at: datetime, cause: Cause) -> None:
        service = self._service
        record = replace(
            self.record,
            checkpoints_insufficient=self.record.checkpoints_insufficient + 1,
            updated_at=service.clock.now(),
        )
        decided = service.leases.decided(
            self.lease, verified=True, scheduled=cause.trigger is CheckpointTrigger.SCHEDULED
        )
        event = ShiftEvent(
            ShiftEventKind.INSUFFICIENT_SPEECH,
            record,
            record.updated_at,
            scheduled_at=scheduled_at,
            trigger=cause.trigger,
            change_similarity=cause.similarity,
        )
        await service.save(
            record,
            service.audit_event(
                AuditAction.SHIFT_CHECKPOINT,
                record,
                "INSUFFICIENT_SPEECH",
                trigger=cause.trigger.value,
            ),
            lease=decided,
            events=[event],
        )
        self.record, self.lease = record, decided
        self.publish(event, recorded=True)


@dataclass(frozen=True)
class CheckedSpeech:
    """A checkpoint's decision on the shift's recent speech, not yet in effect."""

    result: VerificationResult
    recent: RecentSpeech
    embedding: Embedding | None
    audit: tuple[AuditEvent, ...]
    """The decision's audit records: stored by the checkpoint's fenced save, with the state
    they explain, or not at all (a replica that lost the shift decided nothing)."""


@dataclass(frozen=True)
class LoginOutcome:
    shift: ShiftRecord
    verification: VerificationResult | None
    """None for a NOT_ENROLLED shift: there was no voiceprint to check against."""
    assurance: AssuranceRecord | None
    """Signed for the MFA provider when the check passed (and assurances are configured)."""


class ShiftService:
    def __init__(
        self,
        store: Store,
        verification: VerificationService,
        analyser: VoiceAnalyser,
        detector: SpeechDetector,
        pool: InferencePool,
        store_pool: StorePool,
        policy: ShiftPolicy,
        clock: Clock,
        events: EventBus,
        assurances: AssuranceDesk | None = None,
        passive: PassiveEnrollment | None = None,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self._store = store
        self.telemetry = telemetry
        self.passive = passive
        self.detector = detector
        self._assurances = assurances
        self._verification = verification
        self._analyser = analyser
        self.embedder = analyser.embedder
        self._detector = detector
        self.pool = pool
        self._store_pool = store_pool
        self.policy = policy
        self.clock = clock
        self.schedule = CheckpointSchedule(policy)
        self.leases = ShiftLeases(store, store_pool, clock, self.schedule, policy.lease_seconds)
        self._sessions: dict[str, ShiftSession] = {}
        self._subscribers: list[EventSubscription] = []
        # Subscribers may be on another replica: events go to them through the bus, which
        # brings every replica's events back to this one's subscribers (server/shifts/event_bus.py).
        self._bus = events
        self._bus.listen(self._fan_out)
        self._reaper: asyncio.Task[None] | None = None

    # --- use cases ------------------------------------------------------------------------

    async def start(self, agent_id: str, device_id: str, audio: AudioInput) -> LoginOutcome:
        agent_id = validate_agent_id(agent_id)
        if not _DEVICE_ID.fullmatch(device_id):
            raise InvalidRequestError(
                "device_id must be 1-128 characters from A-Z, a-z, 0-9 and . _ @ : -",
                field="device_id",
            )
        passive = self.passive
        enrolling = passive is not None and await self._store_pool.run(
            lambda: passive.collecting(agent_id)
        )
        result = watched = None
        if enrolling:
            # No voiceprint to verify against (NOT_ENROLLED), but the voice is still screened.
            watched = await self.pool.run(
                lambda: self._verification.screen(agent_id, audio, action=AuditAction.SHIFT_LOGIN)
            )
        else:
            result = await self.pool.run(
                lambda: self._verification.verify(agent_id, audio, action=AuditAction.SHIFT_LOGIN)
            )
        now = self.clock.now()
        record = ShiftRecord(
            shift_id=secrets.token_urlsafe(16),
            agent_id=agent_id,
            device_id=device_id,
            state=ShiftState.NOT_ENROLLED if result is None else _state_after_login(result),
            started_at=now,
            updated_at=now,
        )
        started = self.audit_event(
            AuditAction.SHIFT_START, record, record.state.value, device_id=device_id
        )

        owner, expires_at = self.leases.replica_id, self.leases.expiry()

        def create() -> ShiftLease:
            with self._store.unit_of_work(f"start shift {record.shift_id!r}") as unit:
                unit.create_shift(record)
                unit.append_audit(started)
                lease = unit.take_shift_lease(
                    record.shift_id, owner, attached=False, expires_at=expires_at
                )
                if record.state is ShiftState.VERIFIED:
                    lease = self.leases.scheduled(lease)
                    unit.fence_shift(lease)
                return lease

        lease = await self._store_pool.run(create)
        _log(started)
        session = self._session(record)
        session.lease = lease
        if result is None:
            if watched is not None:
                self.publish(passive_shift.watchlist_event(record, watched, self.clock.now()))
            return LoginOutcome(record, None, None)
        self._announce_suspected(session, result)
        return LoginOutcome(record, result, await self._assure(record, result))

    async def check_login(self, shift_id: str, audio: AudioInput) -> LoginOutcome:
        session = await self._active(shift_id)
        agent_id = session.record.agent_id
        result = await self.pool.run(
            lambda: self._verification.verify(agent_id, audio, action=AuditAction.SHIFT_LOGIN)
        )
        if result.decision is Decision.ACCEPT:
            await self._verified(session, AuditAction.SHIFT_RELOGIN)
        self._announce_suspected(session, result)
        return LoginOutcome(session.record, result, await self._assure(session.record, result))

    def _announce_suspected(self, session: ShiftSession, result: VerificationResult) -> None:
        """A login check taken for a spoof is announced to the MFA provider at once: the
        shift stays unverified either way, but someone is presenting the agent's voice. A
        watchlist match is announced to the subscribers alone (the caller is not told)."""
        if result.watchlist is not None:
            self.publish(
                passive_shift.watchlist_event(session.record, result.watchlist, self.clock.now())
            )
        if result.presentation is not None and result.presentation.decision.suspected:
            session.publish(
                ShiftEvent(
                    ShiftEventKind.PRESENTATION_ATTACK,
                    session.record,
                    self.clock.now(),
                    score=result.score,
                    threshold=result.threshold,
                    net_speech_seconds=result.quality.net_speech_seconds,
                    presentation=result.presentation,
                )
            )

    async def unlock(self, shift_id: str, reason: str, *, by: str, role: str) -> ShiftRecord:
        """An admin's or supervisor's unlock, without a login check (e.g. the supervisor
        talked to the agent); the audit record names who (`by`, in `role`) and why."""
        session = await self._active(shift_id)
        if session.record.state is not ShiftState.LOCKED:
            raise ShiftNotLockedError(
                f"shift {shift_id} is {session.record.state.value}, not locked"
            )
        await self._verified(
            session, AuditAction.SHIFT_ADMIN_UNLOCK, reason=reason, unlocked_by=by, role=role
        )
        return session.record

    async def _verified(
        self, session: ShiftSession, action: AuditAction, **details: object
    ) -> None:
        was = session.record.state
        record = replace(
            session.record,
            state=ShiftState.VERIFIED,
            consecutive_failures=0,
            updated_at=self.clock.now(),
        )
        events = (
            [ShiftEvent(ShiftEventKind.SHIFT_VERIFIED, record, record.updated_at)]
            if was is not ShiftState.VERIFIED
            else []
        )
        await self.save(
            record,
            self.audit_event(action, record, "VERIFIED", previous_state=was.value, **details),
            lease=(lease := self.leases.scheduled(session.lease) if session.lease else None),
            events=events,
        )
        session.record, session.lease = record, lease
        for event in events:
            session.publish(event, recorded=True)
        session.ensure_checkpoints()

    async def _assure(
        self, record: ShiftRecord, result: VerificationResult
    ) -> AssuranceRecord | None:
        if self._assurances is None or result.decision is not Decision.ACCEPT:
            return None
        desk = self._assurances
        return await self._store_pool.run(lambda: desk.issue(record))

    async def attach(self, shift_id: str, stream_format: StreamFormat) -> ShiftStream:
        session = await self._active(shift_id, attaching=True)
        if session.record.state is ShiftState.UNVERIFIED:
            raise StreamOrderError(
                f"shift {shift_id} has not passed its login check; call CheckLogin first"
            )
        stream = session.attach(stream_format)
        self.leases.keep_renewed(self._sessions.values)
        return stream

    async def end(self, shift_id: str, *, reason: str = "ended by the client") -> ShiftRecord:
        session = self._sessions.pop(validate_shift_id(shift_id), None)
        lease, record = await self.leases.take_shift(
            shift_id, attached=session is not None and session.streaming
        )
        if record.state is not ShiftState.ENDED:
            now = self.clock.now()
            record = replace(record, state=ShiftState.ENDED, ended_at=now, updated_at=now)
            ended = self.audit_event(AuditAction.SHIFT_END, record, "ENDED", reason=reason)
            # Announced to every subscriber whichever replica holds the shift's stream (that
            # replica ends its stream when it next renews the lease).
            event = ShiftEvent(ShiftEventKind.SHIFT_ENDED, record, record.updated_at)
            await self.save(
                record, ended, revoking=RevocationReason.SHIFT_ENDED, lease=lease, events=[event]
            )
            self.publish(event, recorded=True)
        if session is not None:
            session.record = record
            if session.stream is not None:
                session.stream.deliver(
                    ShiftEvent(ShiftEventKind.SHIFT_ENDED, record, record.updated_at)
                )
            session.stop()
        return record

    async def get(self, shift_id: str) -> ShiftRecord:
        # From the store, not this replica's session: another replica may own the shift now.
        return await self._get_shift(validate_shift_id(shift_id))

    async def page(
        self, states: Collection[ShiftState], limit: int, before: ShiftCursor | None
    ) -> list[ShiftRecord]:
        """A page of shifts, the latest started first. The store is current: every change of
        a shift's state is stored before it is announced."""
        store = self._store
        return await self._store_pool.run(lambda: store.list_shifts(states, limit, before))

    def subscribe(self, agent_id: str = "", after: int | None = None) -> EventSubscription:
        """Every event of every shift from now on (or of one agent's shifts); `after`: from
        the event after this id on, the stored ones first (see EventSubscription)."""
        if agent_id:
            validate_agent_id(agent_id)
        subscription = EventSubscription(self, self._bus, agent_id, after, _SUBSCRIBER_EVENTS)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: EventSubscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    async def close(self) -> None:
        for session in self._sessions.values():
            session.stop()
        self._sessions.clear()
        self.leases.close()
        if self._reaper is not None:
            self._reaper.cancel()

    # --- for sessions ---------------------------------------------------------------------

    def check_speech(
        self, session: ShiftSession, trigger: CheckpointTrigger
    ) -> CheckedSpeech | None:
        """Blocking (worker thread): verifies the shift's most recent speech, or returns None
        while there is not enough of it."""
        assert session.buffer is not None
        needed = self.net_speech_needed(session)
        recent = session.buffer.recent_speech(self._detector, needed)
        if recent is None:
            return None
        voiceprint = self._verification.voiceprint_of(session.record.agent_id)
        sample = self._analyser.analyse_speech(
            recent.speech, source_rate_hz=recent.source_rate_hz, stretch=recent.stretch
        )
        needed_on_its_channel = self.net_speech_needed(session, sample.channel)
        if needed_on_its_channel > needed:
            # A 16 kHz stream that carries a call is scored as telephone speech, which needs
            # the telephone minimum: wait for that much speech as for any checkpoint.
            recent = session.buffer.recent_speech(self._detector, needed_on_its_channel)
            if recent is None:
                return None
            sample = self._analyser.analyse_speech(
                recent.speech, source_rate_hz=recent.source_rate_hz, stretch=recent.stretch
            )
        result, audit = self._verification.decide(
            voiceprint,
            sample,
            action=AuditAction.SHIFT_CHECKPOINT,
            context={"shift_id": session.record.shift_id, "trigger": trigger.value},
        )
        if result.decision is Decision.INCONCLUSIVE:
            # Changes nothing about the shift (the checkpoint looks again): audited as is.
            for event in audit:
                self._store.append_audit(event)
            return None
        return CheckedSpeech(result, recent, sample.embedding, audit)

    def net_speech_needed(self, session: ShiftSession, channel: Channel | None = None) -> float:
        """What the shift's next checkpoint verifies: more speech when its failure would lock
        (ShiftPolicy.confirm_net_speech_seconds), and never less than a check on `channel`
        needs for a decision (VerificationPolicy.min_net_speech_for; by default the channel
        of the stream's format: 8 kHz is telephone). The speech is the buffer's, which holds
        nothing from before the last decided checkpoint."""
        policy = self.policy
        if session.record.consecutive_failures + 1 >= policy.max_consecutive_failures:
            needed = max(policy.checkpoint_net_speech_seconds, policy.confirm_net_speech_seconds)
        else:
            needed = policy.checkpoint_net_speech_seconds
        if channel is None:
            telephone = (
                session.buffer is not None and session.buffer.format.sample_rate_hz < TARGET_RATE
            )
            channel = Channel.TELEPHONE if telephone else Channel.WIDEBAND
        return max(needed, self._verification.min_net_speech_seconds(channel))

    def voiceprint_of(self, agent_id: str) -> Voiceprint:
        """Blocking (store): the agent's voiceprint, for the change watch."""
        return self._verification.voiceprint_of(agent_id)

    async def save(
        self,
        record: ShiftRecord,
        *audit: AuditEvent,
        revoking: RevocationReason | None = None,
        lease: ShiftLease | None = None,
        events: Sequence[ShiftEvent] = (),
    ) -> None:
        """Stores the shift's new state and the audit records of the change in one unit of
        work: a state change is never left unaudited. `revoking` (a shift that ends or locks)
        revokes the shift's latest assurance in the same unit, audited before the change, so
        the token is refused the moment the new state is stored and before it is announced:
        an MFA provider that introspects on the SHIFT_LOCKED or SHIFT_ENDED event finds it
        revoked. `lease` fences the write (server/shifts/lease.py): it is refused with
        ShiftLeaseLostError, writing nothing, if another replica took the shift over. `events`
        are kept for the event bus in the same unit (server/shifts/event_bus.py), so a replica
        that dies after the commit loses none of them; publish them with `recorded=True`."""

        def write() -> list[AuditEvent]:
            with self._store.unit_of_work(f"update shift {record.shift_id!r}") as unit:
                if lease is not None:
                    unit.fence_shift(lease)
                for event in events:
                    self._bus.record(unit, event)
                audited = list(audit)
                if revoking is not None:
                    revocation = unit.revoke_assurance(record.shift_id, revoking, record.updated_at)
                    if revocation is not None:
                        revoked = self.audit_event(
                            AuditAction.ASSURANCE_REVOKE,
                            record,
                            "REVOKED",
                            token_id=revocation.token_id,
                            reason=revoking.value,
                        )
                        audited.insert(0, revoked)
                unit.update_shift(record)
                for audit_event in audited:
                    unit.append_audit(audit_event)
            return audited

        for audit_event in await self._store_pool.run(write):
            _log(audit_event)

    def audit_event(
        self, action: AuditAction, record: ShiftRecord, outcome: str, **details: object
    ) -> AuditEvent:
        return AuditEvent(
            action,
            record.agent_id,
            outcome,
            self.clock.now(),
            {"shift_id": record.shift_id, **details},
        )

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None:
        self._bus.publish(event, recorded=recorded)

    def _fan_out(self, event: ShiftEvent) -> None:
        for subscription in self._subscribers:
            subscription.offer(event)

    def wall_time(self, monotonic: float) -> datetime:
        return self.clock.now() - timedelta(seconds=self.clock.monotonic() - monotonic)

    def forget(self, session: ShiftSession) -> None:
        """Drops the session from memory (another replica owns its shift now)."""
        if self._sessions.get(session.record.shift_id) is session:
            del self._sessions[session.record.shift_id]

    # --- internals ------------------------------------------------------------------------

    async def _get_shift(self, shift_id: str) -> ShiftRecord:
        return await self._store_pool.run(lambda: self._store.get_shift(shift_id))

    async def _active(self, shift_id: str, *, attaching: bool = False) -> ShiftSession:
        """The shift's session, loaded from the store after a restart or an idle drop, with
        its lease taken for this replica (and its state as stored)."""
        session = self._sessions.get(validate_shift_id(shift_id))
        if session is None:
            record = await self._get_shift(shift_id)
            session = self._session(record)
        await self.leases.take(session, attached=attaching or session.streaming)
        if session.record.state is ShiftState.ENDED:
            self.forget(session)
            raise ShiftEndedError(f"shift {shift_id} has ended; start a new shift")
        return session

    def _session(self, record: ShiftRecord) -> ShiftSession:
        session = ShiftSession(self, record)
        if record.state is not ShiftState.ENDED:
            self._sessions[record.shift_id] = session
            self._start_reaper()
        return session

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_idle(), name="shift-reaper")

    async def _reap_idle(self) -> None:
        """Drops sessions with no stream for a while: their state is stored, their audio is
        stale, and a softphone that comes back resumes from the store."""
        idle = self.policy.idle_stream_seconds
        while self._sessions:
            await self.clock.sleep_until(self.clock.monotonic() + idle / 4)
            now = self.clock.monotonic()
            for shift_id, session in list(self._sessions.items()):
                if session.detached_since is not None and now - session.detached_since >= idle:
                    session.stop()
                    del self._sessions[shift_id]


def _log(event: AuditEvent) -> None:
    """Logs an audited shift change once it has committed."""
    log.info(
        "%s shift=%s agent=%s outcome=%s",
        event.action,
        event.details.get("shift_id", "-"),  # a presentation attack's record names none
        logged_agent(event.agent_id),
        event.outcome,
    )


def _state_after_login(result: VerificationResult) -> ShiftState:
    return ShiftState.VERIFIED if result.decision is Decision.ACCEPT else ShiftState.UNVERIFIED
