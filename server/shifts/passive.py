"""A NOT_ENROLLED shift: its stream feeds the agent's passive enrollment (enrollment/passive.py)
instead of checkpoints. Each stretch of speech is collected and the buffer cleared (the audio
is used once, never kept); a refused stretch is audited by enrollment and, if taken for an
attack or a replay, announced. When the voiceprint is built the shift becomes UNVERIFIED (a
login check can verify it now) with ENROLLMENT_COMPLETED, or stays NOT_ENROLLED with
ENROLLMENT_HELD while HR reviews it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from functools import partial
from typing import Protocol

import numpy as np

from enrollment.passive import PassiveEnrollment, PassiveStep
from server.audit_actions import AuditAction
from server.errors import CapacityError, VoxauthError
from server.pipeline.speech import SpeechDetector
from server.records import AuditEvent, ShiftLease, ShiftRecord, ShiftState
from server.runtime.clock import Clock
from server.runtime.inference import InferencePool
from server.scoring.gallery import GalleryMatch
from server.shifts.buffer import RecentSpeech, ShiftAudioBuffer
from server.shifts.events import ShiftEvent, ShiftEventKind

log = logging.getLogger(__name__)

_STRETCH_STEP_SECONDS = 0.5


class ShiftService(Protocol):
    """What collecting needs of the shift service (server/shifts/service.py)."""

    pool: InferencePool
    clock: Clock
    detector: SpeechDetector

    async def save(
        self,
        record: ShiftRecord,
        *audit: AuditEvent,
        lease: ShiftLease | None = None,
        events: Sequence[ShiftEvent] = (),
    ) -> None: ...

    def audit_event(
        self, action: AuditAction, record: ShiftRecord, outcome: str, **details: object
    ) -> AuditEvent: ...

    def publish(self, event: ShiftEvent) -> None: ...

    def wall_time(self, monotonic: float) -> datetime: ...

    async def end(self, shift_id: str, *, reason: str = ...) -> ShiftRecord: ...


class ShiftSession(Protocol):
    """What collecting needs of an active shift."""

    record: ShiftRecord
    buffer: ShiftAudioBuffer | None
    lease: ShiftLease | None

    @property
    def audio_arrived(self) -> asyncio.Event: ...

    def publish(self, event: ShiftEvent, *, recorded: bool = False) -> None: ...


async def collect(service: ShiftService, session: ShiftSession, passive: PassiveEnrollment) -> None:
    """Runs while the shift is NOT_ENROLLED and has a stream."""
    try:
        await _collect(service, session, passive)
    except asyncio.CancelledError:
        raise
    except VoxauthError as error:
        # The agent was erased mid-shift, or the store failed: nothing to enroll into.
        log.warning("shift %s ends: %s", session.record.shift_id, error.message)
        await service.end(session.record.shift_id, reason=error.message)


async def _collect(
    service: ShiftService, session: ShiftSession, passive: PassiveEnrollment
) -> None:
    policy = passive.policy
    while session.record.state is ShiftState.NOT_ENROLLED:
        buffer = session.buffer
        if buffer is None:
            return
        buffer.mark()
        session.audio_arrived.clear()
        try:
            recent = await service.pool.run(
                partial(
                    longest_stretch,
                    buffer,
                    service.detector,
                    policy.passive_stretch_net_speech_seconds,
                )
            )
            if recent is None:
                await session.audio_arrived.wait()
                continue
            buffer.clear()  # Used audio is not kept.
            speech, stretch, rate = recent.speech, recent.stretch, buffer.format.sample_rate_hz
            agent_id, shift_id = session.record.agent_id, session.record.shift_id
            step = await service.pool.run(
                partial(passive.collect, agent_id, shift_id, speech, stretch, rate)
            )
        except CapacityError:
            # The inference pool is busy, or the agent has as many pending stretches as are
            # allowed: look again when more audio has arrived.
            await session.audio_arrived.wait()
            continue
        if step is None:
            return  # Enrolled another way, or held for review: nothing more to collect.
        await _collected(service, session, recent, step)
        if step.finalized is not None:
            return


def watchlist_event(record: ShiftRecord, match: GalleryMatch, at: datetime) -> ShiftEvent:
    """The alert for subscribers that a shift's login voice matched a watchlist entry."""
    return ShiftEvent(
        ShiftEventKind.WATCHLIST_MATCH,
        record,
        at,
        score=match.normalized,
        threshold=match.threshold,
    )


def longest_stretch(
    buffer: ShiftAudioBuffer, detector: SpeechDetector, minimum: float
) -> RecentSpeech | None:
    """All the buffer's speech, up to twice `minimum`, if it holds at least `minimum`: the
    buffer is cleared after each stretch, so speech left out of one would be lost. Blocking
    (the detector); looks at no audio twice (the buffer keeps what it found)."""
    if buffer.recent_speech(detector, minimum) is None:
        return None
    for seconds in np.arange(2 * minimum, minimum, -_STRETCH_STEP_SECONDS):
        longer = buffer.recent_speech(detector, float(seconds))
        if longer is not None:
            return longer
    return buffer.recent_speech(detector, minimum)


async def _collected(
    service: ShiftService, session: ShiftSession, recent: RecentSpeech, step: PassiveStep
) -> None:
    presentation = step.utterance.presentation
    if presentation is not None and presentation.decision.suspected:
        session.publish(
            ShiftEvent(
                ShiftEventKind.PRESENTATION_ATTACK,
                session.record,
                service.clock.now(),
                net_speech_seconds=recent.net_seconds,
                audio_start=service.wall_time(recent.start),
                audio_end=service.wall_time(recent.end),
                presentation=presentation,
            )
        )
    finalized = step.finalized
    if finalized is None:
        return
    now = service.clock.now()
    if finalized.held is not None:
        service.publish(
            ShiftEvent(
                ShiftEventKind.ENROLLMENT_HELD,
                session.record,
                now,
                net_speech_seconds=finalized.voiceprint.net_speech_seconds,
            )
        )
        return
    record = replace(session.record, state=ShiftState.UNVERIFIED, updated_at=now)
    completed = ShiftEvent(
        ShiftEventKind.ENROLLMENT_COMPLETED,
        record,
        now,
        net_speech_seconds=finalized.voiceprint.net_speech_seconds,
    )
    # Fenced by the shift's lease and stored with its event, as every shift change is
    # (server/shifts/lease.py, event_bus.py).
    await service.save(
        record,
        service.audit_event(
            AuditAction.ENROLLMENT_PASSIVE,
            record,
            "completed",
            net_speech_seconds=round(finalized.voiceprint.net_speech_seconds, 2),
            stretches=finalized.voiceprint.utterance_count,
        ),
        lease=session.lease,
        events=[completed],
    )
    session.record = record
    session.publish(completed, recorded=True)
    log.info("shift %s enrolled its agent passively", record.shift_id)
