"""Safe retries end to end (issue 10, "Retries are not safe"): a `voxauth serve` process with
the real model enrolls an agent, FinalizeEnrollment commits, and the server is killed (-9) the
moment it answered, as if its response had been lost on the way. The client retries with the
same request id against the restarted server and gets the first response: one voiceprint, one
audited finalize. A retry of CreateAgent and DeleteAgent returns their first answer too, and
the same id with another request is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from voxauth.v1 import admin_pb2
from voxauth.v1 import admin_pb2_grpc as admin_grpc
from voxauth.v1 import voxauth_pb2 as pb
from voxauth.v1 import voxauth_pb2_grpc as pb_grpc

from server.audit_actions import AuditAction
from tests.e2e.test_upload_memory import ServeProcess, served
from tests.support import SPEAKER_A, first_half, split, wav_audio


def audited(target: str, action: AuditAction) -> list[dict[str, object]]:
    with grpc.insecure_channel(target) as channel:
        export = admin_grpc.AdminServiceStub(channel).ExportAudit(admin_pb2.ExportAuditRequest())
        records = [json.loads(line.line) for line in export]
    return [record for record in records if record["action"] == action]


def test_a_finalize_retried_after_kill_9_returns_the_first_response_and_acts_once(
    tmp_path: Path, key_env: dict[str, str]
) -> None:
    create = pb.CreateAgentRequest(
        agent_id="agent-a", display_name="Agent A", consent_reference="HR-1", request_id="c-1"
    )
    finalize = pb.FinalizeEnrollmentRequest(agent_id="agent-a", request_id="f-1")
    # Each test file holds ~17 s of one speaker (as tests.support.make_config asks).
    key_env = {**key_env, "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "5"}
    with served(tmp_path, key_env) as server:
        with grpc.insecure_channel(server.target) as channel:
            enrollment = pb_grpc.EnrollmentServiceStub(channel)
            created = enrollment.CreateAgent(create)
            for samples in split(first_half(SPEAKER_A), 2):
                added = enrollment.AddEnrollmentAudio(
                    pb.AddEnrollmentAudioRequest(agent_id="agent-a", audio=wav_audio(samples))
                )
                assert added.utterance.accepted, added.utterance.rejection_reason
            first = enrollment.FinalizeEnrollment(finalize)
        # The commit is done and answered; the response is taken as lost with the server.
        server.process.kill()
        server.process.wait(30)

    restarted = ServeProcess(tmp_path, key_env)
    try:
        restarted.wait_until_serving()
        with grpc.insecure_channel(restarted.target) as channel:
            enrollment = pb_grpc.EnrollmentServiceStub(channel)
            retried = enrollment.FinalizeEnrollment(finalize)
            assert retried == first
            assert retried.voiceprint.utterance_count == 2
            # Not ALREADY_EXISTS: the retry gets the agent the first call created.
            assert enrollment.CreateAgent(create) == created

            # The same id for another request is refused, and nothing happens.
            with pytest.raises(grpc.RpcError) as reused:
                enrollment.FinalizeEnrollment(
                    pb.FinalizeEnrollmentRequest(agent_id="agent-b", request_id="f-1")
                )
            assert reused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "request id" in (reused.value.details() or "")

            status = enrollment.GetEnrollmentStatus(
                pb.GetEnrollmentStatusRequest(agent_id="agent-a")
            )
            assert status.voiceprint == first.voiceprint
            finalized = audited(restarted.target, AuditAction.ENROLLMENT_FINALIZE)
            assert [record["outcome"] for record in finalized] == ["ok"]
            assert len(audited(restarted.target, AuditAction.AGENT_CREATE)) == 1

            # An erasure retried after it succeeded is still a success, not NOT_FOUND.
            delete = pb.DeleteAgentRequest(agent_id="agent-a", request_id="d-1")
            enrollment.DeleteAgent(delete)
            enrollment.DeleteAgent(delete)
            assert len(audited(restarted.target, AuditAction.AGENT_DELETE)) == 1
            # The agent's answers went with it: finalizing again is about an agent that is gone.
            with pytest.raises(grpc.RpcError) as gone:
                enrollment.FinalizeEnrollment(finalize)
            assert gone.value.code() is grpc.StatusCode.NOT_FOUND
    finally:
        restarted.close()
