"""Every RPC that takes a shift id refuses a malformed one with INVALID_ARGUMENT naming the
field, and never repeats it (issue 10, item 7: GetAssurance echoed NUL, newlines and bidi
overrides into the error, and a 1 MB id overflowed the status trailer into
RESOURCE_EXHAUSTED). Over a real socket, with the fake embedder standing in for the model."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from voxauth.v1 import admin_pb2, admin_pb2_grpc, assurances_pb2, assurances_pb2_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc
from voxauth.v1 import voxauth_pb2 as pb

from tests.fakes import FakeEmbedder, fake_scoring, pcm16
from tests.support import KEY, RunningServer, make_config

BAD_SHIFT_IDS = {
    "NUL": "shift\x00id",
    "newline": "shift\nFORGED 200 OK",
    "U+202E": "shift\u202edi",
    "1 MB": "s" * 1_000_000,
}

Call = Callable[[grpc.Channel, str], object]


def get_assurance(channel: grpc.Channel, shift_id: str) -> object:
    stub = assurances_pb2_grpc.AssuranceServiceStub(channel)
    return stub.GetAssurance(assurances_pb2.GetAssuranceRequest(shift_id=shift_id), timeout=30)


def get_shift(channel: grpc.Channel, shift_id: str) -> object:
    stub = spb_grpc.ShiftServiceStub(channel)
    return stub.GetShift(spb.GetShiftRequest(shift_id=shift_id), timeout=30)


def end_shift(channel: grpc.Channel, shift_id: str) -> object:
    stub = spb_grpc.ShiftServiceStub(channel)
    return stub.EndShift(spb.EndShiftRequest(shift_id=shift_id), timeout=30)


def check_login(channel: grpc.Channel, shift_id: str) -> object:
    audio = pb.Audio(
        encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=16_000, data=pcm16(0.1, 4.0)
    )
    request = spb.CheckLoginRequest(shift_id=shift_id, login_audio=audio)
    return spb_grpc.ShiftServiceStub(channel).CheckLogin(request, timeout=30)


def stream_shift_audio(channel: grpc.Channel, shift_id: str) -> object:
    header = spb.ShiftAudioHeader(
        shift_id=shift_id, encoding=pb.AUDIO_ENCODING_PCM16LE, sample_rate_hz=16_000
    )
    events = spb_grpc.ShiftServiceStub(channel).StreamShiftAudio(
        iter([spb.ShiftAudio(header=header)]), timeout=30
    )
    return list(events)


def unlock_shift(channel: grpc.Channel, shift_id: str) -> object:
    request = admin_pb2.UnlockShiftRequest(shift_id=shift_id, reason="ticket 42")
    return admin_pb2_grpc.AdminServiceStub(channel).UnlockShift(request, timeout=30)


RPCS: dict[str, Call] = {
    "GetAssurance": get_assurance,
    "GetShift": get_shift,
    "EndShift": end_shift,
    "CheckLogin": check_login,
    "StreamShiftAudio": stream_shift_audio,
    "UnlockShift": unlock_shift,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("server")
    config = replace(
        make_config(directory),
        scoring=fake_scoring(directory / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    running = RunningServer(config, FakeEmbedder, KEY)
    yield running
    running.stop()


@pytest.mark.parametrize("rpc", RPCS)
@pytest.mark.parametrize("what", BAD_SHIFT_IDS)
def test_a_malformed_shift_id_is_invalid_argument_and_never_repeated(
    server: RunningServer, rpc: str, what: str
) -> None:
    shift_id = BAD_SHIFT_IDS[what]
    with pytest.raises(grpc.RpcError) as refused:
        RPCS[rpc](server.channel, shift_id)
    error = refused.value
    message = error.details() or ""
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, message
    assert "shift_id" in message
    # Nothing of the value comes back: not its characters, not a piece of it.
    for character in ("\x00", "\n", "\u202e", "FORGED", "sss"):
        assert character not in message
    status = rpc_status.from_call(error)
    assert status is not None
    (detail,) = status.details
    bad_request = error_details_pb2.BadRequest()
    assert detail.Unpack(bad_request)
    assert [violation.field for violation in bad_request.field_violations] == ["shift_id"]


def test_a_too_long_shift_id_is_told_its_length(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        get_assurance(server.channel, BAD_SHIFT_IDS["1 MB"])
    message = refused.value.details() or ""
    assert "1000000 characters" in message
    assert "at most 64" in message


def test_a_well_formed_shift_id_passes_the_check(server: RunningServer) -> None:
    # An id of the service's own form is looked up (there is no such shift) and, being safe,
    # named in the answer.
    shift_id = "Zx_9-kLm2Qw8VtYb3NcR4a"
    for rpc in (get_assurance, get_shift):
        with pytest.raises(grpc.RpcError) as refused:
            rpc(server.channel, shift_id)
        assert refused.value.code() is grpc.StatusCode.NOT_FOUND
        assert shift_id in (refused.value.details() or "")
