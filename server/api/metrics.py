"""The server's Prometheus metrics, on a registry of its own (not prometheus-client's global
one), served at /metrics by the HTTP side (server/api/http/metrics.py).

Where each figure comes from, so the domain stays free of any metrics library:
- RPC counts and latency: the observing interceptor (server/api/observability.py);
- decisions, PAD refusals, checkpoints, locks, disablings, access denials: the audit records
  as they commit (SecureStore.on_audit), the service's own record of them, so a figure here
  and the audit log cannot disagree;
- inference queue wait, model time, store latency, the change watch's looks and the shift
  work the busy inference pool refused: the Telemetry protocol (server/runtime/telemetry.py),
  which Metrics implements;
- open shifts by state, throttled and disabled agents, the inference queue's depth,
  readiness: read at each scrape (`LiveSources`), from the store and the pools.

Every label takes values from a closed set (methods the server serves, the channels, the
decisions), so no caller can grow the series without bound.
"""

from __future__ import annotations

import importlib.metadata
import logging
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.audit_actions import AuditAction
from server.errors import VoxauthError
from server.pipeline.channel import Channel
from server.pipeline.presentation import PresentationDecision
from server.records import AuditEvent, ShiftState, StoreCensus
from server.runtime.telemetry import LookOutcome, Model
from server.verification.decision import Decision

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_CHECKS: dict[str, str] = {
    AuditAction.VERIFY: "verify",
    AuditAction.SHIFT_LOGIN: "login",
    AuditAction.SHIFT_CHECKPOINT: "checkpoint",
}
"""The label of each decision's action (a StrEnum member is its value as a key)."""
_SCREENED = {**_CHECKS, AuditAction.ENROLLMENT_ADD: "enrollment"}
"""The label of each action whose audio the countermeasure screens."""
INSUFFICIENT_SPEECH = "INSUFFICIENT_SPEECH"
"""A checkpoint's outcome when its time came with too little speech buffered."""
_OUTCOMES = {d.value for d in Decision} | {INSUFFICIENT_SPEECH}
_CHECKPOINT_OUTCOMES = {
    Decision.ACCEPT.value: "passed",
    Decision.REJECT.value: "failed",
    Decision.INCONCLUSIVE.value: "insufficient",
    INSUFFICIENT_SPEECH: "insufficient",
}
_CHANNELS = {c.value for c in Channel}
_SUSPECTED = {d.value for d in PresentationDecision if d.suspected}

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SHORT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)


@dataclass
class LiveSources:
    """What a scrape reads at that moment; each None until the server has it."""

    inference_in_flight: Callable[[], int] | None = None
    inference_queued: Callable[[], int] | None = None
    census: Callable[[], StoreCensus] | None = None
    """Blocking (a store read): scrapes run off the event loop."""
    ready: Callable[[], bool] | None = None


class Metrics:
    """Every metric of one server. Implements server.runtime.telemetry.Telemetry."""

    def __init__(self) -> None:
        registry = self.registry = CollectorRegistry()
        self.live = LiveSources()
        self.rpcs = Counter(
            "voxauth_rpcs",
            "gRPC calls answered, by method and status code.",
            ["method", "code"],
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "voxauth_rpc_duration_seconds",
            "Time from a gRPC call's start to its answer (for streams: its end).",
            ["method"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.decisions = Counter(
            "voxauth_decisions",
            "Verification decisions committed, by check (verify, login, checkpoint), channel "
            "and outcome.",
            ["check", "channel", "outcome"],
            registry=registry,
        )
        self.pad_refusals = Counter(
            "voxauth_pad_refusals",
            "Checks refused as a presentation attack or replay (PAD enforced), by check, "
            "channel and kind (ATTACK, REPLAY).",
            ["check", "channel", "kind"],
            registry=registry,
        )
        self.pad_suspected = Counter(
            "voxauth_pad_suspected",
            "Checks the countermeasure or replay detection suspected, refused or not (PAD in "
            "monitor mode only records them), by check, channel and kind.",
            ["check", "channel", "kind"],
            registry=registry,
        )
        self.checkpoints = Counter(
            "voxauth_checkpoints",
            "Shift checkpoints, by outcome (passed, failed, insufficient speech).",
            ["outcome"],
            registry=registry,
        )
        self.shift_locks = Counter(
            "voxauth_shift_locks", "Shifts locked after failed checkpoints.", registry=registry
        )
        self.verification_disablings = Counter(
            "voxauth_verification_disablings",
            "Agents whose verification was disabled after too many failures.",
            registry=registry,
        )
        self.access_denials = Counter(
            "voxauth_access_denials",
            "Calls refused by access control (no or wrong credentials, role).",
            registry=registry,
        )
        self.inference_wait = Histogram(
            "voxauth_inference_queue_wait_seconds",
            "Time work waited in the inference queue for a worker.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.model_seconds = Histogram(
            "voxauth_model_seconds",
            "Time of one run of a model (speaker: one embedding; countermeasure: one score).",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.store_seconds = Histogram(
            "voxauth_store_call_seconds",
            "Time of a store call, from its submission to the store's threads to its answer.",
            buckets=_SHORT_SECONDS,
            registry=registry,
        )
        self.change_watch_looks = Counter(
            "voxauth_change_watch_looks",
            "Change-watch looks that were due, by outcome: compared (speech embedded and "
            "compared), too_little_speech, skipped_busy (the inference queue was full: no look "
            "until the next interval), failed.",
            ["outcome"],
            registry=registry,
        )
        for outcome in LookOutcome:  # each at 0 from the start: a rate needs a first sample
            self.change_watch_looks.labels(outcome.value)
        self.checkpoints_deferred_busy = Counter(
            "voxauth_checkpoint_attempts_deferred_busy",
            "Attempts of a due checkpoint to check the shift's speech that the full inference "
            "queue refused; the checkpoint tries again when more audio arrives, until its "
            "speech wait ends.",
            registry=registry,
        )
        Info("voxauth_build", "The running voxauth.", registry=registry).info(
            {"version": _version(), "python": platform.python_version()}
        )
        self._models = Info("voxauth_model", "The models in use, once loaded.", registry=registry)
        registry.register(_LiveCollector(self.live))

    def models_loaded(self, speaker: str, countermeasure: str) -> None:
        self._models.info({"speaker": speaker, "countermeasure": countermeasure})

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes. Blocking (the live figures read the store)."""
        return generate_latest(self.registry)

    # --- from the audit records, once committed ----------------------------------------------

    def audit_committed(self, event: AuditEvent) -> None:
        action = event.action
        if action in _CHECKS:
            check = _CHECKS[action]
            outcome = event.outcome if event.outcome in _OUTCOMES else "other"
            self.decisions.labels(check, _channel(event), outcome).inc()
            if action == AuditAction.SHIFT_CHECKPOINT:
                self.checkpoints.labels(_CHECKPOINT_OUTCOMES.get(outcome, "other")).inc()
        elif action == AuditAction.PRESENTATION_ATTACK:
            check = _SCREENED.get(str(event.details.get("check")), "other")
            kind = event.outcome if event.outcome in _SUSPECTED else "other"
            self.pad_suspected.labels(check, _channel(event), kind).inc()
            if event.details.get("pad_enforced") is True:
                self.pad_refusals.labels(check, _channel(event), kind).inc()
        elif action == AuditAction.SHIFT_LOCK:
            self.shift_locks.inc()
        elif action == AuditAction.THROTTLE_DISABLE:
            self.verification_disablings.inc()
        elif action == AuditAction.ACCESS_DENIED:
            self.access_denials.inc()

    # --- Telemetry -----------------------------------------------------------------------------

    def inference_waited(self, seconds: float) -> None:
        self.inference_wait.observe(seconds)

    def model_ran(self, model: Model, seconds: float) -> None:
        self.model_seconds.labels(model.value).observe(seconds)

    def store_called(self, seconds: float) -> None:
        self.store_seconds.observe(seconds)

    def change_watch_looked(self, outcome: LookOutcome) -> None:
        self.change_watch_looks.labels(outcome.value).inc()

    def checkpoint_deferred_busy(self) -> None:
        self.checkpoints_deferred_busy.inc()


def _channel(event: AuditEvent) -> str:
    channel = event.details.get("channel")
    return channel if isinstance(channel, str) and channel in _CHANNELS else "unknown"


def _version() -> str:
    try:
        return importlib.metadata.version("voxauth")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _LiveCollector(Collector):
    """The figures that are a state, not a count: read at each scrape."""

    def __init__(self, live: LiveSources) -> None:
        self._live = live

    def describe(self) -> Iterator[Metric]:
        # Described without reading the sources (the registry asks at registration).
        return iter(())

    def collect(self) -> Iterator[Metric]:
        live = self._live
        if live.ready is not None:
            yield _gauge("voxauth_ready", "1 while new calls should come here.", live.ready())
        if live.inference_in_flight is not None and live.inference_queued is not None:
            yield _gauge(
                "voxauth_inference_in_flight",
                "Inference work running on a worker or queued for one.",
                live.inference_in_flight(),
            )
            yield _gauge(
                "voxauth_inference_queue_depth",
                "Inference work waiting for a worker.",
                live.inference_queued(),
            )
        if live.census is None:
            return
        try:
            census = live.census()
        except VoxauthError as error:
            log.error("metrics: cannot read the store: %s", error.message)
            return
        shifts = GaugeMetricFamily(
            "voxauth_shifts", "Shifts not ended, by state.", labels=["state"]
        )
        for state in ShiftState:
            if state is not ShiftState.ENDED:
                shifts.add_metric([state.value.lower()], census.open_shifts.get(state, 0))
        yield shifts
        yield _gauge(
            "voxauth_agents_throttled",
            "Agents whose next verification attempt must wait after failures.",
            census.agents_delayed,
        )
        yield _gauge(
            "voxauth_agents_disabled",
            "Agents whose verification is disabled until an administrator re-enables it.",
            census.agents_disabled,
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))
