"""Enrollment without an extra step (issue 14, points 1-3), end to end over a real socket with
the real speaker model: a passive enrollment from a shift's stream (which refuses a replayed
stretch) whose next shift verifies; a second agent enrolled with the first one's voice held as
a duplicate until HR approves it; a watchlisted voice raising the alert at login, at Verify
and at enrollment."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from voxauth.v1 import admin_pb2 as apb
from voxauth.v1 import admin_pb2_grpc as apb_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import voxauth_pb2 as pb

from server.config import EnrollmentPolicy
from server.tools.cli import EXIT_OK, main
from tests.softphone import POLICY, ShiftStream
from tests.support import (
    RATE,
    SPEAKER_A,
    SPEAKER_B,
    RunningServer,
    first_half,
    make_config,
    second_half,
    speech,
    split,
    wav_audio,
)

# Two stretches of 4 s of net speech enroll (the tests' files hold ~17 s of one speaker).
PASSIVE = replace(
    EnrollmentPolicy(),
    required_net_speech_seconds=5.0,
    passive_net_speech_seconds=7.5,
    passive_stretch_net_speech_seconds=4.0,
)


@pytest.fixture
def server(start_server: Callable[..., RunningServer], tmp_path: Path) -> RunningServer:
    return start_server(replace(make_config(tmp_path), shifts=POLICY, enrollment=PASSIVE))


def subscribe(server: RunningServer, agent_id: str) -> queue.Queue[spb.ShiftEvent]:
    """The MFA provider's subscription to the agent's shift events, read on a thread."""
    subscription = server.shifts.SubscribeShiftEvents(
        spb.SubscribeShiftEventsRequest(agent_id=agent_id)
    )
    seen: queue.Queue[spb.ShiftEvent] = queue.Queue()

    def listen() -> None:
        try:
            for event in subscription:
                seen.put(event)
        except grpc.RpcError:
            pass

    threading.Thread(target=listen, daemon=True).start()
    return seen


def next_of_kind(
    events: queue.Queue[spb.ShiftEvent], kind: spb.ShiftEventKind.ValueType
) -> spb.ShiftEvent:
    while (event := events.get(timeout=60)).kind != kind:
        pass
    return event


def status(server: RunningServer, agent_id: str) -> pb.EnrollmentStatus:
    return server.enrollment.GetEnrollmentStatus(pb.GetEnrollmentStatusRequest(agent_id=agent_id))


def wait_for_pending(server: RunningServer, agent_id: str, count: int) -> None:
    deadline = time.monotonic() + 60
    while len(status(server, agent_id).pending_utterances) < count:
        assert time.monotonic() < deadline, "the stretch was not collected"
        time.sleep(0.1)


def audit_lines(server: RunningServer) -> list[dict[str, Any]]:
    admin = apb_grpc.AdminServiceStub(server.channel)
    return [json.loads(r.line) for r in admin.ExportAudit(apb.ExportAuditRequest())]


def start(server: RunningServer, agent_id: str, login: pb.Audio) -> spb.LoginCheckResponse:
    return server.shifts.StartShift(
        spb.StartShiftRequest(agent_id=agent_id, device_id="softphone-1", login_audio=login)
    )


def test_a_shift_enrolls_its_agent_passively_refusing_a_replay_and_the_next_shift_verifies(
    server: RunningServer,
) -> None:
    created = server.enrollment.CreateAgent(
        pb.CreateAgentRequest(
            agent_id="new-hire",
            display_name="New Hire",
            consent_reference="HR-77",
            passive_enrollment=True,
        )
    )
    assert created.passive_enrollment and not created.enrolled
    voice = speech(SPEAKER_A)
    first, second, login = voice[: 6 * RATE], voice[6 * RATE : 12 * RATE], voice[12 * RATE :]
    events = subscribe(server, "new-hire")

    started = start(server, "new-hire", wav_audio(login))
    # Voice is not a factor yet: no verification, no assurance, never VERIFIED.
    assert started.shift.state == spb.SHIFT_STATE_NOT_ENROLLED
    assert not started.HasField("verification")
    assert started.assurance == ""
    # Nor can a login check pass before the voiceprint exists.
    with pytest.raises(grpc.RpcError) as early:
        server.shifts.CheckLogin(
            spb.CheckLoginRequest(shift_id=started.shift.shift_id, login_audio=wav_audio(login))
        )
    assert early.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    stream = ShiftStream(server.shifts, started.shift.shift_id)
    assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED

    stream.send(first)
    wait_for_pending(server, "new-hire", 1)
    # The same recording played into the call again is a replay: refused, announced, audited.
    stream.send(first)
    replayed = stream.next_event()
    assert replayed.kind == spb.SHIFT_EVENT_KIND_PRESENTATION_ATTACK
    assert replayed.presentation_attack.decision == pb.PRESENTATION_DECISION_REPLAY
    assert replayed.shift.state == spb.SHIFT_STATE_NOT_ENROLLED
    assert len(status(server, "new-hire").pending_utterances) == 1

    stream.send(second)
    completed = stream.next_event()
    assert completed.kind == spb.SHIFT_EVENT_KIND_ENROLLMENT_COMPLETED
    assert completed.shift.state == spb.SHIFT_STATE_UNVERIFIED
    assert completed.net_speech_seconds >= PASSIVE.passive_net_speech_seconds
    assert next_of_kind(events, spb.SHIFT_EVENT_KIND_ENROLLMENT_COMPLETED).shift_id == (
        started.shift.shift_id
    )
    enrolled = status(server, "new-hire")
    assert enrolled.agent.enrolled and not enrolled.agent.passive_enrollment
    assert enrolled.voiceprint.utterance_count == 2
    stream.close()
    server.shifts.EndShift(spb.EndShiftRequest(shift_id=started.shift.shift_id))

    nxt = start(server, "new-hire", wav_audio(login))
    assert nxt.shift.state == spb.SHIFT_STATE_VERIFIED
    assert nxt.verification.decision == pb.DECISION_ACCEPT
    assert nxt.assurance

    audited = audit_lines(server)
    replays = [
        r
        for r in audited
        if r["action"] == "presentation_attack"
        and r["details"].get("check") == "enrollment.passive"
    ]
    assert len(replays) == 1
    assert any(r["action"] == "enrollment.passive" and r["outcome"] == "completed" for r in audited)


def test_a_second_agent_with_the_first_ones_voice_is_held_until_hr_approves(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    first = server.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    assert not first.HasField("held")
    other = server.enroll("agent-b", split(first_half(SPEAKER_B), 2))
    assert not other.HasField("held")

    # Another agent id, enrolled with agent-a's voice (the other half of its recording).
    duplicate = server.enroll("agent-a2", split(second_half(SPEAKER_A), 2))
    assert duplicate.held.reason == pb.HOLD_REASON_DUPLICATE
    assert duplicate.held.matching_agent_id == "agent-a"
    held = status(server, "agent-a2")
    assert not held.agent.enrolled
    assert held.held_voiceprint.matching_agent_id == "agent-a"
    with pytest.raises(grpc.RpcError) as refused:
        server.verify("agent-a2", wav_audio(second_half(SPEAKER_A)))
    assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert any(
        r["action"] == "enrollment.hold" and r["details"].get("matching_agent") == "agent-a"
        for r in audit_lines(server)
    )

    with pytest.raises(grpc.RpcError) as no_reason:
        server.enrollment.ReviewVoiceprint(
            pb.ReviewVoiceprintRequest(agent_id="agent-a2", approve=True)
        )
    assert no_reason.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    cli = ["--server", f"127.0.0.1:{server.port}", "--insecure"]
    assert main(["status", *cli, "agent-a2"]) == EXIT_OK
    assert "held for review (duplicate: matches agent-a)" in capsys.readouterr().out
    assert main(["agents", "approve", *cli, "agent-a2", "--reason", "HR-CASE-5: twin"]) == EXIT_OK
    assert "voiceprint approved and active" in capsys.readouterr().out
    assert status(server, "agent-a2").agent.enrolled
    assert server.verify("agent-a2", wav_audio(first_half(SPEAKER_A))).decision == (
        pb.DECISION_ACCEPT
    )
    with pytest.raises(grpc.RpcError) as nothing:
        server.enrollment.ReviewVoiceprint(
            pb.ReviewVoiceprintRequest(agent_id="agent-a2", approve=False, reason="again")
        )
    assert nothing.value.code() is grpc.StatusCode.FAILED_PRECONDITION


def test_a_watchlisted_voice_raises_the_alert_at_login_verify_and_enrollment(
    server: RunningServer,
) -> None:
    server.enroll("dismissed", split(first_half(SPEAKER_B), 2))
    server.enroll("colleague", split(first_half(SPEAKER_A), 2))
    admin = apb_grpc.AdminServiceStub(server.channel)
    expiry = Timestamp(seconds=int(time.time()) + 86_400 * 30)
    entry = admin.AddWatchlistEntry(
        apb.AddWatchlistEntryRequest(
            label="Dismissed 2026-11",
            legal_basis="LEGAL-REVIEW-12",
            expires_at=expiry,
            audio=wav_audio(second_half(SPEAKER_B)),
        )
    )
    listed = admin.ListWatchlist(apb.ListWatchlistRequest())
    assert [e.entry_id for e in listed.entries] == [entry.entry_id]
    events = subscribe(server, "")

    login = start(server, "dismissed", wav_audio(first_half(SPEAKER_B)))
    alert = next_of_kind(events, spb.SHIFT_EVENT_KIND_WATCHLIST_MATCH)
    assert alert.shift_id == login.shift.shift_id
    assert alert.score >= alert.threshold
    assert server.verify("dismissed", wav_audio(first_half(SPEAKER_B))).watchlist_alert
    assert not server.verify("colleague", wav_audio(second_half(SPEAKER_A))).watchlist_alert

    # Under a new id, passively enrolled: its first shift has no voiceprint to verify, but the
    # login voice is screened all the same.
    server.enrollment.CreateAgent(
        pb.CreateAgentRequest(
            agent_id="new-id", display_name="New", consent_reference="HR-8", passive_enrollment=True
        )
    )
    first_shift = start(server, "new-id", wav_audio(first_half(SPEAKER_B)))
    assert first_shift.shift.state == spb.SHIFT_STATE_NOT_ENROLLED
    assert next_of_kind(events, spb.SHIFT_EVENT_KIND_WATCHLIST_MATCH).shift_id == (
        first_shift.shift.shift_id
    )

    rehired = server.enroll("rehired", split(first_half(SPEAKER_B), 2))
    assert rehired.held.reason == pb.HOLD_REASON_WATCHLIST
    assert rehired.held.watchlist_entry_id == entry.entry_id
    alerts = [r for r in audit_lines(server) if r["action"] == "watchlist.match"]
    assert {r["details"]["check"] for r in alerts} == {
        "shift.login",
        "verify",
        "enrollment.finalize",
    }

    admin.DeleteWatchlistEntry(apb.DeleteWatchlistEntryRequest(entry_id=entry.entry_id))
    assert not admin.ListWatchlist(apb.ListWatchlistRequest()).entries
    assert not server.verify("dismissed", wav_audio(first_half(SPEAKER_B))).watchlist_alert
    with pytest.raises(grpc.RpcError) as gone:
        admin.DeleteWatchlistEntry(apb.DeleteWatchlistEntryRequest(entry_id=entry.entry_id))
    assert gone.value.code() is grpc.StatusCode.NOT_FOUND
