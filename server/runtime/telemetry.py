"""What the runtime and the pipeline tell monitoring: how long work waited and ran. A protocol
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


class Telemetry(Protocol):
    """Called from any thread; each call must be quick and must not raise."""

    def inference_waited(self, seconds: float) -> None:
        """Work waited this long in the inference queue before a worker took it."""

    def model_ran(self, model: Model, seconds: float) -> None:
        """One run of `model` took this long."""

    def store_called(self, seconds: float) -> None:
        """A store call took this long, from its submission to its answer."""


class _NoTelemetry:
    def inference_waited(self, seconds: float) -> None:
        pass

    def model_ran(self, model: Model, seconds: float) -> None:
        pass

    def store_called(self, seconds: float) -> None:
        pass


NO_TELEMETRY: Telemetry = _NoTelemetry()
