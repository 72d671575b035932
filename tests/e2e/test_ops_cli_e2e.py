"""`voxauth shifts|agents|keys|config` against a real server behind mutual TLS: a shift the
real model locks is listed, refused to a softphone's certificate, unlocked by a supervisor's,
and the unlock is audited with the supervisor's name."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from voxauth.v1 import admin_pb2
from voxauth.v1 import admin_pb2_grpc as admin_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

from server.audit_actions import AuditAction
from server.security.certificates import create_pki
from server.security.identity import Role
from server.tools.cli import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, main
from tests.softphone import POLICY, ShiftStream, fail_until_locked
from tests.support import (
    OTHER_1,
    OTHER_2,
    SPEAKER_A,
    RunningServer,
    as_role,
    first_half,
    second_half,
    speech,
    split,
    tls_config,
    wav_audio,
)


def test_supervisor_lists_and_unlocks_a_locked_shift_and_admin_commands_work(
    start_server: Callable[..., RunningServer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pki = create_pki(tmp_path / "pki")
    config = replace(tls_config(tmp_path, pki), shifts=POLICY)
    voxauth = start_server(config, credentials=as_role(pki, Role.HR))
    voxauth.enroll("agent-a", split(first_half(SPEAKER_A), 2))
    target = f"127.0.0.1:{voxauth.port}"
    with grpc.secure_channel(target, as_role(pki, Role.SOFTPHONE)) as softphone:
        shifts = spb_grpc.ShiftServiceStub(softphone)
        started = shifts.StartShift(
            spb.StartShiftRequest(
                agent_id="agent-a",
                device_id="desk-1",
                login_audio=wav_audio(second_half(SPEAKER_A)),
            )
        )
        shift_id = started.shift.shift_id
        stream = ShiftStream(shifts, shift_id)
        assert stream.next_event().kind == spb.SHIFT_EVENT_KIND_STREAM_ATTACHED
        fail_until_locked(stream, voxauth.advance, [speech(OTHER_1), speech(OTHER_2)])

        server = ["--server", target, "--pki-dir", str(pki.folder)]

        def as_(role: str) -> list[str]:
            return ["--cert", str(pki.client_certificate(role)), "--key", str(pki.client_key(role))]

        capsys.readouterr()
        assert main(["shifts", "list", *server, "--state", "locked", "--json"]) == EXIT_OK
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [(s["shift_id"], s["state"], s["checkpoints_failed"]) for s in listed] == [
            (shift_id, "locked", 2)
        ]
        assert main(["shifts", "list", *server, "--state", "ended"]) == EXIT_OK
        assert capsys.readouterr().out.splitlines()[-1] == "0 shift(s)"

        # A softphone may not unlock, nor list; a supervisor may not re-enable an agent.
        for command in (["shifts", "unlock", shift_id, "--reason", "x"], ["shifts", "list"]):
            assert main([*command, *server, *as_("softphone")]) == EXIT_REFUSED
            assert "PERMISSION_DENIED" in capsys.readouterr().err
        enable = ["agents", "enable-verification", "agent-a", "--reason", "HD-9"]
        assert main([*enable, *server, *as_("supervisor")]) == EXIT_REFUSED
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        with pytest.raises(SystemExit) as usage:  # --reason is required
            main(["shifts", "unlock", shift_id, *server])
        assert usage.value.code == EXIT_USAGE
        capsys.readouterr()

        reason = "called the agent back on their desk phone"
        assert main(["shifts", "unlock", shift_id, "--reason", reason, *server]) == EXIT_OK
        assert "unlocked: verified" in capsys.readouterr().out
        assert main(["shifts", "unlock", shift_id, "--reason", reason, *server]) == EXIT_REFUSED
        assert "FAILED_PRECONDITION" in capsys.readouterr().err
        assert main(["shifts", "show", shift_id, *server, "--json"]) == EXIT_OK
        shown = json.loads(capsys.readouterr().out)
        assert (shown["state"], shown["consecutive_failures"]) == ("verified", 0)
        stream.close()

    assert main([*enable, *server]) == EXIT_OK
    assert main(["keys", "rotate", *server]) == EXIT_OK
    assert "new active signing key:" in capsys.readouterr().out
    assert main(["config", "--remote", *server]) == EXIT_OK
    remote = json.loads(capsys.readouterr().out)
    assert remote["shifts"]["max_consecutive_failures"] == 2

    with grpc.secure_channel(target, as_role(pki, Role.SUPERVISOR)) as supervisor:
        listing = spb_grpc.ShiftServiceStub(supervisor).ListShifts
        page = listing(spb.ListShiftsRequest(page_size=1))
        assert [s.shift_id for s in page.shifts] == [shift_id] and page.next_page_token == ""
        for bad in (
            spb.ListShiftsRequest(page_size=501),
            spb.ListShiftsRequest(page_token="not-a-token"),
            spb.ListShiftsRequest(states=[spb.ShiftState.ValueType(77)]),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                listing(bad)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    with grpc.secure_channel(target, as_role(pki, Role.ADMIN)) as admin:
        records = [
            json.loads(r.line)
            for r in admin_grpc.AdminServiceStub(admin).ExportAudit(admin_pb2.ExportAuditRequest())
        ]
    unlocks = [r for r in records if r["action"] == AuditAction.SHIFT_ADMIN_UNLOCK]
    assert len(unlocks) == 1
    assert (
        unlocks[0]["details"].items()
        >= {
            "shift_id": shift_id,
            "reason": reason,
            "unlocked_by": "supervisor",
            "role": "supervisor",
        }.items()
    )
    re_enabled = [r for r in records if r["action"] == AuditAction.THROTTLE_RE_ENABLE]
    assert [r["details"].get("by") for r in re_enabled] == ["admin"]
