"""Presentation-attack detection (PAD): the countermeasure's score of a check, the threshold of
its channel for the operator's target bona-fide rejection rate, and the decision.

The countermeasure sees the check as it arrived, pauses included: the raw AASIST checkpoint
reads silence (speech-only audio scores about 2 lower, server/tools/ATTACKS.md), and the
calibration was measured on whole recordings; only pauses longer than a second are cut to one
(models.countermeasure.judged_audio), since the calibration's read speech has none and a
shift's stretch holds the customer's turns as pauses of several seconds. It runs on its own
worker thread while speech detection and the embedding run on the caller's, so a check costs
the longer of the two, not their sum.
"""

from __future__ import annotations

import contextvars
import enum
import json
import statistics
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.countermeasure import Countermeasure, CountermeasureEvidence
from models.embedder import Waveform
from server.config import PresentationAttackPolicy
from server.errors import ConfigurationError
from server.pipeline.channel import Channel
from server.runtime.telemetry import NO_TELEMETRY, Model, Telemetry

PAD_CALIBRATION_FORMAT = "voxauth-pad-calibration/1"


class PresentationDecision(enum.Enum):
    NOT_ASSESSED = "NOT_ASSESSED"
    """Too little audio for the countermeasure."""
    BONA_FIDE = "BONA_FIDE"
    ATTACK = "ATTACK"
    """The countermeasure's score is below the channel's threshold."""
    REPLAY = "REPLAY"
    """The audio repeats an enrollment utterance or a recent check of the agent."""

    @property
    def suspected(self) -> bool:
        return self in (PresentationDecision.ATTACK, PresentationDecision.REPLAY)


@dataclass(frozen=True)
class PresentationAssessment:
    score: float
    """The countermeasure's bona-fide score; 0 when NOT_ASSESSED."""
    threshold: float
    """The score the channel needs; 0 when NOT_ASSESSED."""
    decision: PresentationDecision
    enforced: bool
    """False in monitor mode: reported and audited, refusing nothing."""

    @property
    def refuses(self) -> bool:
        """Whether this assessment refuses the check."""
        return self.enforced and self.decision.suspected

    def as_replay(self) -> PresentationAssessment:
        return PresentationAssessment(
            self.score, self.threshold, PresentationDecision.REPLAY, self.enforced
        )

    def audit_details(self) -> dict[str, object]:
        return {
            "pad_score": round(self.score, 3),
            "pad_threshold": round(self.threshold, 3),
            "pad_decision": self.decision.value,
            "pad_enforced": self.enforced,
        }


@dataclass(frozen=True)
class ChannelCalibration:
    """The genuine scores of one channel on the calibration split, as a normal distribution:
    with 54 speakers per channel an empirical 2% quantile would be the lowest score or two."""

    mean: float
    sd: float
    count: int

    def threshold(self, target_bpcer: float) -> float:
        return self.mean + self.sd * statistics.NormalDist().inv_cdf(target_bpcer)


@dataclass(frozen=True)
class PadCalibration:
    model_id: str
    channels: Mapping[Channel, ChannelCalibration]

    @classmethod
    def load(cls, path: Path, model_id: str) -> PadCalibration:
        """Raises ConfigurationError when the file is missing, malformed or made for another
        countermeasure: thresholds of another model's scores would mean nothing."""
        try:
            document: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigurationError(
                f"cannot read the PAD calibration {path}: {error} (make it with `voxauth "
                f"attacks calibrate`)"
            ) from error
        if document.get("format") != PAD_CALIBRATION_FORMAT:
            raise ConfigurationError(f"{path} is not a PAD calibration ({PAD_CALIBRATION_FORMAT})")
        if document.get("model_id") != model_id:
            raise ConfigurationError(
                f"the PAD calibration {path} was made for countermeasure "
                f"{document.get('model_id')}, but this server runs {model_id}: run `voxauth "
                f"attacks calibrate` for it"
            )
        try:
            channels = {
                channel: ChannelCalibration(
                    float(entry["genuine_mean"]), float(entry["genuine_sd"]), int(entry["count"])
                )
                for channel in Channel
                for entry in [document["channels"][channel.value]]
            }
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigurationError(f"{path}: malformed channel entry ({error})") from error
        return cls(model_id, channels)


def default_pad_calibration_path() -> Path:
    return Path(__file__).resolve().parents[2] / "models" / "scoring" / "pad_calibration.json"


PendingScore = Future[CountermeasureEvidence | None]


class PresentationAttackDetector:
    """Scores checks with the countermeasure on its own threads and decides per channel."""

    def __init__(
        self,
        countermeasure: Countermeasure,
        calibration: PadCalibration,
        policy: PresentationAttackPolicy,
        *,
        workers: int = 1,
        telemetry: Telemetry = NO_TELEMETRY,
    ) -> None:
        self.countermeasure = countermeasure
        self._telemetry = telemetry
        self._thresholds = {
            channel: entry.threshold(policy.target_for(channel is Channel.TELEPHONE))
            for channel, entry in calibration.channels.items()
        }
        self._enforced = policy.enforced
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pad")

    @property
    def model_id(self) -> str:
        return self.countermeasure.model_id

    def threshold(self, channel: Channel) -> float:
        return self._thresholds[channel]

    def submit(self, waveform: Waveform) -> PendingScore:
        """Starts scoring `waveform` (16 kHz, as it arrived); the result is None when it is
        too short for the countermeasure. The channel's score follows in `assess`, once the
        speech analysis beside it has told the channel."""
        # In the caller's context, so the scoring's log lines name the caller's request.
        return self._executor.submit(contextvars.copy_context().run, self._score, waveform)

    def _score(self, waveform: Waveform) -> CountermeasureEvidence | None:
        if len(waveform) < self.countermeasure.min_samples:
            return None
        started = time.monotonic()
        evidence = self.countermeasure.evidence(waveform)
        self._telemetry.model_ran(Model.COUNTERMEASURE, time.monotonic() - started)
        return evidence

    def assess(
        self, evidence: CountermeasureEvidence | None, channel: Channel
    ) -> PresentationAssessment:
        if evidence is None:
            return PresentationAssessment(
                0.0, 0.0, PresentationDecision.NOT_ASSESSED, self._enforced
            )
        score = self.countermeasure.channel_score(evidence, channel.value)
        threshold = self._thresholds[channel]
        decision = (
            PresentationDecision.BONA_FIDE if score >= threshold else PresentationDecision.ATTACK
        )
        return PresentationAssessment(score, threshold, decision, self._enforced)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
