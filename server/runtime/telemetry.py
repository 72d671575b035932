"""What the runtime, the pipeline and the shifts tell monitoring: how long work waited and ran,
and the shifts' background work the busy inference pool refused. A protocol
here, so that no domain or runtime module imports a metrics library; the Prometheus adapter is
server/api/metrics.py, and code built without one (tests, tools) reports to NO_TELEMETRY."""

from __future__ import annotations

import enum
from typing import Protocol


class Model(enum.Enum):
    SPEAKER = "speaker"
    """The speaker network (ECAPA-TDNN): one embedding."""
    COUNTERMEASURE = "countermeasure"
    """The presentation-attack countermeasure (AASIST): one score."""


class LookOutcome(enum.Enum):
    """What came of one change-watch look that was due (server/shifts/change_watch.py)."""

    COMPARED = "compared"
    """It embedded the newest speech and compared it with the agent's voice."""
    TOO_LITTLE_SPEECH = "too_little_speech"
    """Too little new speech to compare: no model call; the next look comes after more."""
    SKIPPED_BUSY = "skipped_busy"
    """The inference queue was full: skipped, the next look comes with the next interval."""
    FAILED = "failed"
    """An error (logged): e.g. the voiceprint could not be read."""


class Telemetry(Protocol):
    """Called from any thread; each call must be quick and must not raise."""

    def inference_waited(self, seconds: float) -> None:
        """Work waited this long in the inference queue before a worker took it."""

    def model_ran(self, model: Model, seconds: float) -> None:
        """One run of `model` took this long."""

    def store_called(self, seconds: float) -> None:
        """A store call took this long, from its submission to its answer."""

    def change_watch_looked(self, outcome: LookOutcome) -> None:
        """A shift's change watch made (or, busy, skipped) one look."""

    def checkpoint_deferred_busy(self) -> None:
        """A due checkpoint's check of the shift's speech was refused by the full inference
        queue: the checkpoint tries again when more audio arrives, until its speech wait ends
        (undecided by then, it counts as insufficient speech)."""


class _NoTelemetry:
    def inference_waited(self, seconds: float) -> None:
        pass

    def model_ran(self, model: Model, seconds: float) -> None:
        pass

    def store_called(self, seconds: float) -> None:
        pass

    def change_watch_looked(self, outcome: LookOutcome) -> None:
        pass

    def checkpoint_deferred_busy(self) -> None:
        pass


NO_TELEMETRY: Telemetry = _NoTelemetry()
