"""Metrics and probes of a running server after real calls: the real models on real speech
over a real gRPC socket, /metrics scraped over the HTTP side as Prometheus would, and the
figures checked against the calls made."""

from __future__ import annotations

import grpc
import pytest
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from server.runtime.log_format import PSEUDONYMS
from tests.support import (
    OTHER_1,
    SPEAKER_A,
    MetricSamples,
    RunningServer,
    first_half,
    http_get,
    metric,
    second_half,
    speech,
    split,
    wav_audio,
)

VERIFY = "/voxauth.v1.VerificationService/Verify"
ENROLL = "/voxauth.v1.EnrollmentService/AddEnrollmentAudio"


def scrape(server: RunningServer) -> MetricSamples:
    answer = http_get(server.http_url("/metrics"))
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    return server.scrape()


def test_metrics_count_and_time_real_enrollments_verifications_and_shifts(
    voxauth: RunningServer,
) -> None:
    assert http_get(voxauth.http_url("/readyz")).status == 200
    before = scrape(voxauth)
    assert metric(before, "voxauth_ready") == 1
    assert metric(before, "voxauth_rpcs_total", method=VERIFY, code="OK") == 0

    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    accepted = voxauth.verify("agent-a", wav_audio(second_half(SPEAKER_A)))
    rejected = voxauth.verify("agent-a", wav_audio(speech(OTHER_1)[: 16_000 * 5]))
    with pytest.raises(grpc.RpcError) as unknown:
        voxauth.verify("nobody", wav_audio(second_half(SPEAKER_A)))
    started = voxauth.shifts.StartShift(
        spb.StartShiftRequest(
            agent_id="agent-a", device_id="desk-1", login_audio=wav_audio(second_half(SPEAKER_A))
        )
    )
    assert (accepted.decision, rejected.decision) == (pb.DECISION_ACCEPT, pb.DECISION_REJECT)
    assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
    assert started.shift.state == spb.SHIFT_STATE_VERIFIED

    after = scrape(voxauth)

    # RPCs by method and status, and their latency.
    assert metric(after, "voxauth_rpcs_total", method=VERIFY, code="OK") == 2
    assert metric(after, "voxauth_rpcs_total", method=VERIFY, code="NOT_FOUND") == 1
    assert metric(after, "voxauth_rpcs_total", method=ENROLL, code="OK") == 2
    assert metric(after, "voxauth_rpc_duration_seconds_count", method=VERIFY) == 3
    # A check with the real models takes a measurable time, well under the largest bucket.
    verify_seconds = metric(after, "voxauth_rpc_duration_seconds_sum", method=VERIFY)
    assert 0.01 < verify_seconds < 60
    # Decisions, from the audit records.
    for outcome in ("ACCEPT", "REJECT"):
        assert (
            metric(
                after,
                "voxauth_decisions_total",
                check="verify",
                channel="wideband",
                outcome=outcome,
            )
            == 1
        )
    assert (
        metric(
            after, "voxauth_decisions_total", check="login", channel="wideband", outcome="ACCEPT"
        )
        == 1
    )
    # Model time: one embedding per check, and per enrollment utterance (plus its telephone
    # companion voiceprint); the countermeasure scores each check beside it.
    speaker_runs = metric(after, "voxauth_model_seconds_count", model="speaker")
    assert speaker_runs >= 3 + 2
    assert metric(after, "voxauth_model_seconds_count", model="countermeasure") >= 3
    assert metric(after, "voxauth_model_seconds_sum", model="speaker") > 0
    # The inference queue took every check and enrollment upload; it is empty now.
    assert metric(after, "voxauth_inference_queue_wait_seconds_count") >= 5
    assert metric(after, "voxauth_inference_queue_depth") == 0
    assert metric(after, "voxauth_inference_in_flight") == 0
    assert metric(after, "voxauth_store_call_seconds_count") > metric(
        before, "voxauth_store_call_seconds_count"
    )
    # States, read at the scrape.
    assert metric(after, "voxauth_shifts", state="verified") == 1
    assert metric(after, "voxauth_shifts", state="locked") == 0
    assert metric(after, "voxauth_agents_disabled") == 0
    # What is running.
    [model_info] = [key for key in after if key[0] == "voxauth_model_info"]
    assert dict(model_info[1])["speaker"] == accepted.model_id
    assert any(key[0] == "voxauth_build_info" for key in after)


def test_erasing_an_agent_gives_the_log_new_pseudonyms(voxauth: RunningServer) -> None:
    voxauth.enrollment.CreateAgent(
        pb.CreateAgentRequest(agent_id="agent-z", display_name="Z", consent_reference="HR-1")
    )
    before = PSEUDONYMS.of("agent-z")

    voxauth.enrollment.DeleteAgent(pb.DeleteAgentRequest(agent_id="agent-z"))

    # The key the erased agent's log lines were written under is gone: they cannot be linked.
    assert PSEUDONYMS.of("agent-z") != before
