"""What a shift reports as it goes: the events its softphone stream and the MFA provider's
subscription receive (SubscribeShiftEvents), each also audited."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from server.pipeline.presentation import PresentationAssessment
from server.records import ShiftRecord
from server.scoring.calibration import DecidedBy
from server.shifts.change_watch import CheckpointTrigger


class ShiftEventKind(enum.Enum):
    STREAM_ATTACHED = "STREAM_ATTACHED"
    CHECKPOINT_PASSED = "CHECKPOINT_PASSED"
    CHECKPOINT_FAILED = "CHECKPOINT_FAILED"
    INSUFFICIENT_SPEECH = "INSUFFICIENT_SPEECH"
    SHIFT_LOCKED = "SHIFT_LOCKED"
    SHIFT_VERIFIED = "SHIFT_VERIFIED"
    SHIFT_ENDED = "SHIFT_ENDED"
    PRESENTATION_ATTACK = "PRESENTATION_ATTACK"
    """A login check was taken for a presentation attack or a replay, or a passive
    enrollment refused a stretch as one."""
    ENROLLMENT_COMPLETED = "ENROLLMENT_COMPLETED"
    """The shift's passive enrollment built the agent's voiceprint and it is active: the
    shift is UNVERIFIED, and a login check can now verify it."""
    ENROLLMENT_HELD = "ENROLLMENT_HELD"
    """The passive enrollment built a voiceprint that waits for HR's review (a duplicate of
    another agent, a watchlist match, or approval policy). To subscribers only."""
    WATCHLIST_MATCH = "WATCHLIST_MATCH"
    """The login voice matched a watchlist entry (an alert). To subscribers only: the caller
    is not told."""
    SECOND_VOICE = "SECOND_VOICE"
    """Speech unlike the agent's on the agent's leg, the agent's own before and after it
    (audio_start to audio_end; score: its similarity, threshold: the watch's)."""


@dataclass(frozen=True)
class ShiftEvent:
    kind: ShiftEventKind
    shift: ShiftRecord
    at: datetime
    scheduled_at: datetime | None = None
    score: float = 0.0
    threshold: float = 0.0
    net_speech_seconds: float = 0.0
    audio_start: datetime | None = None
    audio_end: datetime | None = None
    decided_by: DecidedBy | None = None
    """Which bound set the checkpoint's threshold; None for other kinds."""
    presentation: PresentationAssessment | None = None
    """CHECKPOINT_PASSED/FAILED and PRESENTATION_ATTACK: the presentation-attack check."""
    trigger: CheckpointTrigger | None = None
    """CHECKPOINT_PASSED/FAILED and INSUFFICIENT_SPEECH: what started the checkpoint."""
    change_similarity: float = 0.0
    """CHANGE_WATCH checkpoints: the similarity of the stretch that triggered it."""
    event_id: int = 0
    """Its place in the store's one order of events (server/shifts/event_bus.py), the same on
    every replica; given once the event is stored, so 0 on the softphone's stream."""
