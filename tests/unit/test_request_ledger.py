"""Safe retries (issue 10, "Retries are not safe"): a request id makes a retry return the first
call's response instead of acting twice; the same id with another request is refused; ids of
different callers never meet; an expired id acts again; two calls at once act once; and the
enrollment use cases commit the completion in their own unit of work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from voxauth.v1 import voxauth_pb2 as pb

from enrollment.service import EnrollmentService
from server.api.retries import RequestDigest
from server.config import AudioLimits, EnrollmentPolicy, StoreLimits
from server.errors import InvalidRequestError, RequestIdReusedError
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.speech import QualityThresholds
from server.runtime.requests import Receipt, RequestKey, RequestLedger, Response, request_key
from server.runtime.store_pool import StorePool
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, Store, UnitOfWork, UtteranceRecord
from server.storage.sqlite import open_store
from tests.clock import ManualClock
from tests.fakes import AGENT_VOICE, AllSpeech, FakeEmbedder
from tests.support import KEY

RETENTION = timedelta(hours=24)
FINALIZE = RequestKey("hr-portal", "FinalizeEnrollment", "retry-1")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    yield opened
    opened.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def pool() -> Iterator[StorePool]:
    store_pool = StorePool(StoreLimits())
    yield store_pool
    store_pool.shutdown()


class CountingAction:
    """An action that answers a new response each time it acts (the nth call: b"n"), as a
    non-idempotent action would; `gate`, when set, holds each call until it opens."""

    def __init__(self, gate: asyncio.Event | None = None, fail: bool = False) -> None:
        self.calls = 0
        self.acting = asyncio.Event()
        self._gate = gate
        self._fail = fail

    async def __call__(self, receipt: Receipt | None) -> Response:
        self.calls += 1
        self.acting.set()
        if self._gate is not None:
            await self._gate.wait()
        if self._fail:
            raise RuntimeError("the action failed")
        return Response(str(self.calls).encode(), "")


def run(
    ledger: RequestLedger,
    act: Callable[[Receipt | None], Awaitable[Response]],
    key: RequestKey | None = FINALIZE,
    digest: bytes = b"request",
) -> bytes:
    return asyncio.run(ledger.run(key, digest, act))


def test_a_retry_with_the_same_id_returns_the_first_response_without_acting_again(
    store: Store, pool: StorePool, clock: ManualClock
) -> None:
    ledger = RequestLedger(store, pool, RETENTION, clock)
    act = CountingAction()
    assert run(ledger, act) == b"1"
    assert run(ledger, act) == b"1"
    assert act.calls == 1
    # Without an id, every call acts.
    assert run(ledger, act, key=None) == b"2"
    assert run(ledger, act, key=None) == b"3"


def test_the_same_id_with_a_different_request_is_refused(
    store: Store, pool: StorePool, clock: ManualClock
) -> None:
    ledger = RequestLedger(store, pool, RETENTION, clock)
    act = CountingAction()
    run(ledger, act, digest=b"finalize a1")
    with pytest.raises(RequestIdReusedError, match="different FinalizeEnrollment request"):
        run(ledger, act, digest=b"finalize a2")
    assert act.calls == 1


def test_different_callers_and_methods_with_the_same_id_are_independent(
    store: Store, pool: StorePool, clock: ManualClock
) -> None:
    ledger = RequestLedger(store, pool, RETENTION, clock)
    act = CountingAction()
    run(ledger, act)
    other_caller = RequestKey("another-portal", FINALIZE.method, FINALIZE.request_id)
    other_method = RequestKey(FINALIZE.caller, "CreateAgent", FINALIZE.request_id)
    assert run(ledger, act, key=other_caller, digest=b"another request") == b"2"
    assert run(ledger, act, key=other_method, digest=b"another request") == b"3"
    assert run(ledger, act) == b"1"


def test_an_expired_id_acts_again(store: Store, pool: StorePool, clock: ManualClock) -> None:
    ledger = RequestLedger(store, pool, RETENTION, clock)
    act = CountingAction()
    run(ledger, act)
    clock.advance(RETENTION - timedelta(seconds=1))
    assert run(ledger, act) == b"1"
    clock.advance(timedelta(seconds=1))
    assert run(ledger, act) == b"2"
    # And once expired, even another request may take the id.
    clock.advance(RETENTION)
    assert run(ledger, act, digest=b"another request") == b"3"


def test_a_failed_call_is_not_kept_so_its_retry_acts(
    store: Store, pool: StorePool, clock: ManualClock
) -> None:
    ledger = RequestLedger(store, pool, RETENTION, clock)
    with pytest.raises(RuntimeError, match="failed"):
        run(ledger, CountingAction(fail=True))
    act = CountingAction()
    assert run(ledger, act) == b"1"
    assert act.calls == 1


def test_two_calls_at_once_with_the_same_id_act_once_and_answer_alike(
    store: Store, pool: StorePool, clock: ManualClock
) -> None:
    async def scenario() -> tuple[list[bytes], int]:
        gate = asyncio.Event()
        act = CountingAction(gate)
        ledger = RequestLedger(store, pool, RETENTION, clock)
        first = asyncio.create_task(ledger.run(FINALIZE, b"request", act))
        second = asyncio.create_task(ledger.run(FINALIZE, b"request", act))
        await act.acting.wait()
        # The second waits for the first rather than acting beside it.
        await asyncio.sleep(0.05)
        assert act.calls == 1 and not second.done()
        gate.set()
        return list(await asyncio.gather(first, second)), act.calls

    responses, calls = asyncio.run(scenario())
    assert responses == [b"1", b"1"]
    assert calls == 1


@pytest.mark.parametrize(
    "request_id", ["has space", "x" * 129, "new\nline", "slash/id", "é"], ids=repr
)
def test_a_malformed_request_id_is_invalid_argument(request_id: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        request_key("hr-portal", "CreateAgent", request_id)
    assert refused.value.field == "request_id"


def test_a_uuid_or_any_128_allowed_characters_make_a_request_id() -> None:
    assert request_key("c", "m", "3f2c7a1e-0d4b-4c8e-9a51-1b6f0e2d7c90") is not None
    assert request_key("c", "m", "A.b_c:d-" * 16) is not None
    assert request_key("c", "m", "") is None


def test_the_request_digest_leaves_out_the_id_and_covers_everything_else() -> None:
    audio = pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=b"RIFF....")
    first = pb.AddEnrollmentAudioRequest(agent_id="a1", audio=audio, request_id="r1")
    retry = pb.AddEnrollmentAudioRequest(agent_id="a1", audio=audio, request_id="r2")
    other_audio = pb.AddEnrollmentAudioRequest(
        agent_id="a1", audio=pb.Audio(encoding=pb.AUDIO_ENCODING_WAV, data=b"RIFF...!")
    )
    other_agent = pb.AddEnrollmentAudioRequest(agent_id="a2", audio=audio)
    assert RequestDigest.of(first) == RequestDigest.of(retry)
    assert RequestDigest.of(first) != RequestDigest.of(other_audio)
    assert RequestDigest.of(first) != RequestDigest.of(other_agent)
    # A stream is hashed chunk by chunk: the same bytes cut differently are another request.
    chunks = [
        pb.EnrollmentAudioChunk(agent_id="a1", data=b"ab"),
        pb.EnrollmentAudioChunk(data=b"c"),
    ]
    recut = [pb.EnrollmentAudioChunk(agent_id="a1", data=b"a"), pb.EnrollmentAudioChunk(data=b"bc")]
    whole, other = RequestDigest(), RequestDigest()
    for chunk in chunks:
        whole.add(chunk)
    for chunk in recut:
        other.add(chunk)
    assert whole.digest() != other.digest()


# --- the enrollment use cases record the completion in their own unit of work ----------------


def enrollment_with_pending_speech(store: Store, clock: ManualClock) -> EnrollmentService:
    store.create_agent(AgentRecord("a1", "Agent", "HR-1", clock.now()))
    for n in range(2):
        store.add_utterance(
            UtteranceRecord(
                utterance_id=f"u{n}",
                agent_id="a1",
                model_id=FakeEmbedder.model_id,
                embedding=AGENT_VOICE + np.float32(n) * 0.01,
                duration_seconds=12.0,
                net_speech_seconds=12.0,
                speech_level_dbfs=-25.0,
                clipped_fraction=0.0,
                received_at=clock.now(),
            ),
            max_pending=32,
        )
    analyser = VoiceAnalyser(FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    return EnrollmentService(store, analyser, EnrollmentPolicy(), clock.now)


def test_a_finalize_whose_completion_cannot_be_recorded_does_not_happen(
    store: Store, clock: ManualClock
) -> None:
    service = enrollment_with_pending_speech(store, clock)

    def crash(unit: UnitOfWork, outcome: object) -> None:
        raise RuntimeError("killed between the voiceprint and its completion record")

    with pytest.raises(RuntimeError, match="killed"):
        service.finalize("a1", crash)
    assert store.get_voiceprint("a1") is None
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["u0", "u1"]


def test_a_finalize_and_its_completion_commit_together(store: Store, clock: ManualClock) -> None:
    service = enrollment_with_pending_speech(store, clock)
    receipt = Receipt(FINALIZE, b"request", clock.now() + RETENTION)
    outcome = service.finalize(
        "a1", lambda unit, done: receipt.record(unit, b"voiceprint of a1", done.voiceprint.agent_id)
    )
    assert outcome.voiceprint.utterance_count == 2
    assert store.get_voiceprint("a1") is not None
    recorded = store.recorded_response(FINALIZE, b"request", clock.now())
    assert recorded is not None and recorded.response == b"voiceprint of a1"
    # Erasing the agent erases the answer that names it.
    service.delete("a1")
    assert store.recorded_response(FINALIZE, b"request", clock.now()) is None
