"""The Prometheus adapter (server/api/metrics.py): audit records and telemetry become the
figures a scrape shows, every label stays in its closed set, and a scrape survives a store
that cannot be read. Also: the Grafana dashboard in deploy/ asks only for exported metrics."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from server.api.metrics import Metrics
from server.audit_actions import AuditAction
from server.errors import StorageError
from server.records import AuditEvent, ShiftState, StoreCensus
from server.runtime.telemetry import LookOutcome, Model
from tests.support import MetricSamples, api_server, make_config, metric, parse_metrics

NOW = datetime(2026, 12, 1, tzinfo=UTC)
GET_SHIFT = "/voxauth.v1.ShiftService/GetShift"
DASHBOARD = Path(__file__).parents[2] / "deploy" / "grafana" / "voxauth.json"


def scrape(metrics: Metrics) -> MetricSamples:
    return parse_metrics(metrics.exposition().decode())


def event(action: AuditAction, outcome: str, **details: object) -> AuditEvent:
    return AuditEvent(action, "agent-1", outcome, NOW, details)


def test_audit_records_become_decisions_checkpoints_and_refusals() -> None:
    metrics = Metrics()
    for committed in [
        event(AuditAction.VERIFY, "ACCEPT", channel="wideband"),
        event(AuditAction.VERIFY, "REJECT", channel="telephone"),
        event(AuditAction.SHIFT_LOGIN, "INCONCLUSIVE", channel="wideband"),
        event(AuditAction.SHIFT_CHECKPOINT, "ACCEPT", channel="wideband"),
        event(AuditAction.SHIFT_CHECKPOINT, "REJECT", channel="wideband"),
        event(AuditAction.SHIFT_CHECKPOINT, "REJECT", channel="wideband"),
        event(AuditAction.SHIFT_CHECKPOINT, "INSUFFICIENT_SPEECH", shift_id="s1"),
        event(
            AuditAction.PRESENTATION_ATTACK,
            "ATTACK",
            check="verify",
            channel="telephone",
            pad_enforced=True,
        ),
        event(
            AuditAction.PRESENTATION_ATTACK,
            "REPLAY",
            check="enrollment.add",
            channel="wideband",
            pad_enforced=False,
        ),
        event(AuditAction.SHIFT_LOCK, "LOCKED", shift_id="s1"),
        event(AuditAction.THROTTLE_DISABLE, "DISABLED"),
        event(AuditAction.ACCESS_DENIED, "PERMISSION_DENIED"),
        event(AuditAction.AGENT_CREATE, "ok"),  # not a figure
    ]:
        metrics.audit_committed(committed)

    samples = scrape(metrics)

    decisions = "voxauth_decisions_total"
    assert metric(samples, decisions, check="verify", channel="wideband", outcome="ACCEPT") == 1
    assert metric(samples, decisions, check="verify", channel="telephone", outcome="REJECT") == 1
    assert (
        metric(samples, decisions, check="login", channel="wideband", outcome="INCONCLUSIVE") == 1
    )
    assert metric(samples, decisions, check="checkpoint", channel="wideband", outcome="REJECT") == 2
    checkpoints = "voxauth_checkpoints_total"
    assert [metric(samples, checkpoints, outcome=o) for o in ("passed", "failed")] == [1, 2]
    assert metric(samples, checkpoints, outcome="insufficient") == 1
    refusals = "voxauth_pad_refusals_total"
    assert metric(samples, refusals, check="verify", channel="telephone", kind="ATTACK") == 1
    # A suspected replay in monitor mode is suspected, not refused.
    suspected = "voxauth_pad_suspected_total"
    assert metric(samples, suspected, check="enrollment", channel="wideband", kind="REPLAY") == 1
    assert metric(samples, refusals, check="enrollment", channel="wideband", kind="REPLAY") == 0
    assert metric(samples, "voxauth_shift_locks_total") == 1
    assert metric(samples, "voxauth_verification_disablings_total") == 1
    assert metric(samples, "voxauth_access_denials_total") == 1


def test_labels_stay_in_their_closed_sets_whatever_a_record_holds() -> None:
    metrics = Metrics()
    for n in range(50):
        metrics.audit_committed(event(AuditAction.VERIFY, f"outcome-{n}", channel=f"chan-{n}"))
        metrics.audit_committed(
            event(AuditAction.PRESENTATION_ATTACK, f"kind-{n}", check=f"check-{n}")
        )

    series = {key for key in scrape(metrics) if key[0].startswith("voxauth_decisions")}

    assert series == {
        (
            "voxauth_decisions_total",
            frozenset({("check", "verify"), ("channel", "unknown"), ("outcome", "other")}),
        ),
        (
            "voxauth_decisions_created",
            frozenset({("check", "verify"), ("channel", "unknown"), ("outcome", "other")}),
        ),
    }
    suspected = [key for key in scrape(metrics) if key[0] == "voxauth_pad_suspected_total"]
    assert suspected == [
        (
            "voxauth_pad_suspected_total",
            frozenset({("check", "other"), ("channel", "unknown"), ("kind", "other")}),
        )
    ]


def test_telemetry_and_live_figures_are_scraped() -> None:
    metrics = Metrics()
    metrics.inference_waited(0.02)
    metrics.model_ran(Model.SPEAKER, 0.3)
    metrics.model_ran(Model.COUNTERMEASURE, 0.2)
    metrics.store_called(0.001)
    metrics.change_watch_looked(LookOutcome.COMPARED)
    metrics.change_watch_looked(LookOutcome.SKIPPED_BUSY)
    metrics.change_watch_looked(LookOutcome.SKIPPED_BUSY)
    metrics.checkpoint_deferred_busy()
    metrics.models_loaded("ecapa-1", "aasist-1")
    metrics.live.ready = lambda: True
    metrics.live.inference_in_flight = lambda: 5
    metrics.live.inference_queued = lambda: 3
    metrics.live.census = lambda: StoreCensus(
        {ShiftState.VERIFIED: 4, ShiftState.UNVERIFIED: 1, ShiftState.LOCKED: 2}, 3, 1
    )

    samples = scrape(metrics)

    assert metric(samples, "voxauth_inference_queue_wait_seconds_count") == 1
    assert metric(samples, "voxauth_inference_queue_wait_seconds_bucket", le="0.025") == 1
    assert metric(samples, "voxauth_model_seconds_sum", model="speaker") == pytest.approx(0.3)
    assert metric(samples, "voxauth_model_seconds_count", model="countermeasure") == 1
    assert metric(samples, "voxauth_store_call_seconds_count") == 1
    looks = "voxauth_change_watch_looks_total"
    assert [
        metric(samples, looks, outcome=o.value)
        for o in (LookOutcome.COMPARED, LookOutcome.SKIPPED_BUSY, LookOutcome.FAILED)
    ] == [1, 2, 0]
    # Every outcome is exported from the start (at 0), so a rate has a first sample.
    assert {dict(labels)["outcome"] for name, labels in samples if name == looks} == {
        o.value for o in LookOutcome
    }
    assert metric(samples, "voxauth_checkpoint_attempts_deferred_busy_total") == 1
    assert metric(samples, "voxauth_ready") == 1
    assert (
        metric(samples, "voxauth_inference_in_flight"),
        metric(samples, "voxauth_inference_queue_depth"),
    ) == (5, 3)
    assert [
        metric(samples, "voxauth_shifts", state=s) for s in ("verified", "unverified", "locked")
    ] == [4, 1, 2]
    assert (
        metric(samples, "voxauth_agents_throttled"),
        metric(samples, "voxauth_agents_disabled"),
    ) == (3, 1)
    assert metric(samples, "voxauth_model_info", speaker="ecapa-1", countermeasure="aasist-1") == 1


def test_a_store_that_cannot_be_read_leaves_the_rest_of_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    metrics.live.ready = lambda: False

    def broken() -> StoreCensus:
        raise StorageError("database is locked")

    metrics.live.census = broken

    samples = scrape(metrics)

    assert metric(samples, "voxauth_ready") == 0
    assert not any(key[0] == "voxauth_shifts" for key in samples)
    assert "database is locked" in caplog.text


def test_calls_are_counted_by_status_and_made_up_methods_not_at_all(tmp_path: Path) -> None:
    metrics = Metrics()

    async def scenario() -> list[grpc.StatusCode]:
        codes = []
        async with (
            api_server(make_config(tmp_path), metrics) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            for method in [GET_SHIFT, GET_SHIFT, *(f"/evil.Service/M{n}" for n in range(20))]:
                call = channel.unary_unary(
                    method, request_serializer=bytes, response_deserializer=bytes
                )
                try:
                    await call(b"", timeout=10)
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
        return codes

    codes = asyncio.run(scenario())

    assert codes[:2] == [grpc.StatusCode.UNAVAILABLE] * 2  # the model is not loaded
    assert set(codes[2:]) == {grpc.StatusCode.UNIMPLEMENTED}
    samples = scrape(metrics)
    assert metric(samples, "voxauth_rpcs_total", method=GET_SHIFT, code="UNAVAILABLE") == 2
    assert metric(samples, "voxauth_rpc_duration_seconds_count", method=GET_SHIFT) == 2
    methods = {
        dict(labels).get("method") for name, labels in samples if name.startswith("voxauth_rpc")
    }
    assert methods == {GET_SHIFT}


def test_two_servers_in_one_process_count_apart() -> None:
    first, second = Metrics(), Metrics()
    first.audit_committed(event(AuditAction.SHIFT_LOCK, "LOCKED"))
    assert metric(scrape(first), "voxauth_shift_locks_total") == 1
    assert metric(scrape(second), "voxauth_shift_locks_total") == 0


_METRIC_NAME = re.compile(r"\bvoxauth_[a-zA-Z0-9_:]*")
_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_info")


def _exported_names() -> set[str]:
    """Every sample name a fully running server exports."""
    metrics = Metrics()
    metrics.live.ready = lambda: True
    metrics.live.inference_in_flight = metrics.live.inference_queued = lambda: 0
    metrics.live.census = lambda: StoreCensus({}, 0, 0)
    metrics.models_loaded("s", "c")
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES)
    return names


def _queries(panel: dict[str, object]) -> list[str]:
    targets = panel.get("targets", [])
    assert isinstance(targets, list)
    return [str(target["expr"]) for target in targets]


def test_every_dashboard_panel_queries_metrics_the_service_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = _exported_names()
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert len(panels) >= 10

    for panel in panels:
        queries = _queries(panel)
        assert queries, f"panel {panel['title']!r} has no query"
        for query in queries:
            used = set(_METRIC_NAME.findall(query))
            assert used, f"panel {panel['title']!r}: {query!r} uses no voxauth metric"
            unknown = used - exported
            assert not unknown, f"panel {panel['title']!r} asks for {sorted(unknown)}"


def test_the_dashboard_check_finds_a_misspelt_metric() -> None:
    exported = _exported_names()
    assert set(_METRIC_NAME.findall("rate(voxauth_decision_total[5m])")) - exported
    assert not set(_METRIC_NAME.findall("rate(voxauth_decisions_total[5m])")) - exported
