"""The change watch between checkpoints, on the fake voice (positive audio is the agent's,
negative an impostor's): what a look suspects, when it looks at all, second voices, and the
shift service's triggered checkpoints, follow-ups and locks on a manual clock."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from server.api.metrics import Metrics
from server.audit_actions import AuditAction
from server.config import (
    AudioLimits,
    InferenceLimits,
    ShiftPolicy,
    StoreLimits,
    VerificationPolicy,
)
from server.errors import CapacityError
from server.pipeline.analysis import AudioInput, VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding, encode_mulaw
from server.pipeline.speech import QualityThresholds
from server.runtime.inference import InferencePool
from server.runtime.store_pool import StorePool
from server.runtime.telemetry import NO_TELEMETRY, Telemetry
from server.security.crypto import VoiceprintCipher
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from server.shifts.change_watch import ChangeWatch, CheckpointTrigger, speech_by_level
from server.shifts.event_bus import StoreEventBus
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.shifts.service import ShiftService, ShiftStream
from server.storage.interface import AgentRecord, ShiftState, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_VOICE,
    FAKE_VOICE_POLICY,
    MODEL_ID,
    AllSpeech,
    FakeEmbedder,
    fake_verification,
)
from tests.support import KEY, metric, parse_metrics

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
AGENT = "agent-13"
PCM16 = StreamFormat.declared(AudioEncoding.PCM16LE, 16_000)
MULAW = StreamFormat.declared(AudioEncoding.MULAW, 8_000)
VOICEPRINT = Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, T0, 3, 20.0)
# Checkpoints at their random time only after 1,000 s: whatever runs before was triggered.
POLICY = replace(
    ShiftPolicy(),
    mean_checkpoint_interval_seconds=1000.0,
    checkpoint_jitter_seconds=0.0,
    min_checkpoint_gap_seconds=10.0,
    checkpoint_net_speech_seconds=4.0,
    confirm_net_speech_seconds=8.0,
    speech_wait_seconds=60.0,
    speech_recheck_seconds=1.0,
    change_watch_interval_seconds=5.0,
    change_watch_speech_seconds=2.0,
    second_voice_window_seconds=30.0,
)


def talking(sign: float, seconds: int) -> np.ndarray:
    """Speech of the fake voice: each second 0.6 s at level 0.3 (of the sign's voice), then a
    0.4 s pause at line-noise level."""
    second = np.concatenate([np.full(9_600, 0.3 * sign), np.full(6_400, 0.001)])
    return np.tile(second, seconds).astype(np.float32)


def pcm(samples: np.ndarray) -> bytes:
    return bytes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


AGENT_SPEECH = talking(1.0, 1)
IMPOSTOR_SPEECH = talking(-1.0, 1)


def buffer_with(*parts: np.ndarray, start: float = 0.0) -> ShiftAudioBuffer:
    buffer = ShiftAudioBuffer(PCM16, max_age_seconds=90)
    at = start
    for part in parts:
        data = pcm(part)
        for i in range(0, len(data), 32_000):
            at += 1.0
            buffer.append(data[i : i + 32_000], at)
    return buffer


# --- the look ---------------------------------------------------------------------------------


def test_speech_is_picked_by_level_only_where_there_are_speech_and_pauses() -> None:
    picked = speech_by_level(talking(1.0, 5), 2.0)
    assert picked is not None and len(picked) == 32_000
    assert np.all(picked > 0.2)  # the pauses are left out
    assert speech_by_level(talking(1.0, 5), 4.0) is None  # 3 s of speech in 5 s
    rng = np.random.default_rng(3)
    for unusable in (
        np.zeros(80_000, dtype=np.float32),  # silence
        (0.001 * rng.standard_normal(80_000)).astype(np.float32),  # quiet line noise
        (0.2 * rng.standard_normal(80_000)).astype(np.float32),  # loud, steady noise
    ):
        assert speech_by_level(unusable, 2.0) is None


def test_the_agents_voice_is_not_suspected_and_another_is() -> None:
    watch = ChangeWatch(POLICY, FakeEmbedder())
    agent = watch.look(buffer_with(talking(1.0, 6)), lambda: VOICEPRINT)
    assert agent is not None and not agent.suspected
    assert agent.similarity == pytest.approx(1.0)
    assert watch.record(agent) is None
    other = watch.look(buffer_with(talking(1.0, 6), talking(-1.0, 6)), lambda: VOICEPRINT)
    assert other is not None and other.suspected
    assert other.similarity == pytest.approx(0.0)
    # It covers the newest audio since the previous look, not before.
    assert other.start >= agent.end


def test_the_speech_that_passed_the_last_checkpoint_counts_as_the_agents() -> None:
    # The agent sounds unlike the voiceprint today (another headset), like the checkpoint
    # it passed a minute ago: no change.
    today = replace(VOICEPRINT, embedding=np.array([0, 1, 0, 0], dtype=np.float32))
    watch = ChangeWatch(POLICY, FakeEmbedder())
    look = watch.look(buffer_with(talking(1.0, 6)), lambda: today)
    assert look is not None and look.suspected
    watch.passed(AGENT_VOICE)
    look = watch.look(buffer_with(talking(1.0, 6)), lambda: today)
    assert look is not None and not look.suspected


def test_a_telephone_stream_is_compared_with_the_telephone_voiceprint() -> None:
    telephone_only = replace(
        VOICEPRINT,
        embedding=np.array([0, 1, 0, 0], dtype=np.float32),
        telephone_embedding=AGENT_VOICE,
    )
    buffer = ShiftAudioBuffer(MULAW, max_age_seconds=90)
    data = encode_mulaw(talking(1.0, 6)[::2])
    for i in range(0, len(data), 8_000):
        buffer.append(data[i : i + 8_000], 1.0 + i / 8_000)
    look = ChangeWatch(POLICY, FakeEmbedder()).look(buffer, lambda: telephone_only)
    assert look is not None and not look.suspected


def test_too_little_speech_costs_no_model_call_and_the_next_look_comes_sooner() -> None:
    class Counting(FakeEmbedder):
        calls = 0

        def embed(self, waveform: np.ndarray) -> np.ndarray:
            Counting.calls += 1
            return super().embed(waveform)

    watch = ChangeWatch(POLICY, Counting())
    assert not watch.heard(4.9)
    assert watch.heard(0.2)
    watch.begin()
    look = watch.look(buffer_with(np.zeros(16_000 * 5, dtype=np.float32)), lambda: VOICEPRINT)
    assert look is None and Counting.calls == 0
    watch.record(look)
    # A quarter of an interval more audio, not a whole one.
    assert not watch.heard(1.0)
    assert watch.heard(0.3)


def test_the_watch_off_never_looks() -> None:
    watch = ChangeWatch(replace(POLICY, change_watch=False), FakeEmbedder())
    assert not watch.heard(10_000.0)


def test_a_second_voice_is_unlike_speech_between_the_agents_own() -> None:
    watch = ChangeWatch(POLICY, FakeEmbedder())
    buffer = buffer_with(talking(1.0, 6))
    first = watch.look(buffer, lambda: VOICEPRINT)
    assert watch.record(first) is None
    at = 6.0
    looks = []
    for part in (talking(-1.0, 6), talking(-1.0, 6), talking(1.0, 6)):
        data = pcm(part)
        for i in range(0, len(data), 32_000):
            at += 1.0
            buffer.append(data[i : i + 32_000], at)
        looks.append(watch.look(buffer, lambda: VOICEPRINT))
    assert [look is not None and look.suspected for look in looks] == [True, True, False]
    # A takeover so far: unlike speech and nothing else.
    assert watch.record(looks[0]) is None
    assert watch.record(looks[1]) is None
    # The agent speaks again: the unlike speech was a second voice, with its span.
    second = watch.record(looks[2])
    assert second is not None
    assert looks[0] is not None and looks[1] is not None
    assert (second.start, second.end) == (looks[0].start, looks[1].end)
    assert second.similarity == pytest.approx(0.0)
    # Reported once.
    assert watch.record(looks[2]) is None


def test_unlike_speech_older_than_the_window_is_no_second_voice() -> None:
    watch = ChangeWatch(POLICY, FakeEmbedder())
    buffer = buffer_with(talking(-1.0, 6))
    unlike = watch.look(buffer, lambda: VOICEPRINT)
    assert unlike is not None and unlike.suspected
    watch.record(unlike)
    data = pcm(talking(1.0, 40))
    for i in range(0, len(data), 32_000):
        buffer.append(data[i : i + 32_000], 7.0 + i / 32_000)
    agent = watch.look(buffer, lambda: VOICEPRINT)
    assert agent is not None and not agent.suspected
    assert watch.record(agent) is None


# --- the service ------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecureStore]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    opened.create_agent(AgentRecord(AGENT, "Agent Thirteen", "HR-13", T0))
    opened.replace_voiceprint(VOICEPRINT, [])
    yield opened
    opened.close()


class Shift:
    """A shift on the fake voice, streamed one second at a time on the manual clock."""

    def __init__(
        self, service: ShiftService, clock: ManualClock, stream: ShiftStream, shift_id: str
    ) -> None:
        self.shift_id = shift_id
        self.service = service
        self.clock = clock
        self.stream = stream
        self.events: list[ShiftEvent] = []

    async def speak(self, sign: float, seconds: int) -> None:
        data = pcm(talking(sign, seconds))
        for i in range(0, len(data), 32_000):
            self.clock.advance(1.0)
            self.stream.push(data[i : i + 32_000])
            await asyncio.sleep(0.01)  # the look and checkpoint run on worker threads

    async def until(self, kind: ShiftEventKind) -> ShiftEvent:
        while True:
            event = await asyncio.wait_for(self.stream.next_event(), 10.0)
            assert event is not None
            self.events.append(event)
            if event.kind is kind:
                return event

    def kinds(self) -> list[tuple[ShiftEventKind, CheckpointTrigger | None]]:
        while self.stream._events:
            item = self.stream._events.popleft()
            assert isinstance(item, ShiftEvent)
            self.events.append(item)
        return [(e.kind, e.trigger) for e in self.events]


async def start_shift(
    store: SecureStore,
    tmp_path: Path,
    policy: ShiftPolicy,
    verification_policy: VerificationPolicy = FAKE_VOICE_POLICY,
    pool: InferencePool | None = None,
    telemetry: Telemetry = NO_TELEMETRY,
) -> Shift:
    clock = ManualClock(T0)
    analyser = VoiceAnalyser(FakeEmbedder(), AllSpeech(), QualityThresholds(), AudioLimits())
    store_pool = StorePool(StoreLimits())
    events = StoreEventBus(store, store_pool, None, clock, 3600.0)
    await events.open()
    service = ShiftService(
        store,
        fake_verification(
            store, tmp_path / "scoring", clock.now, verification_policy=verification_policy
        ),
        analyser,
        AllSpeech(),
        pool or InferencePool(InferenceLimits()),
        store_pool,
        policy,
        clock,
        events,
        telemetry=telemetry,
    )
    login = AudioInput(pcm(talking(1.0, 6)), AudioEncoding.PCM16LE, 16_000)
    started = await service.start(AGENT, "softphone-13", login)
    assert started.shift.state is ShiftState.VERIFIED
    stream = await service.attach(started.shift.shift_id, PCM16)
    shift = Shift(service, clock, stream, started.shift.shift_id)
    await shift.until(ShiftEventKind.STREAM_ATTACHED)
    return shift


def audited(store: SecureStore, action: AuditAction) -> list[dict[str, object]]:
    return [e.details | {"outcome": e.outcome} for e in store.audit_events() if e.action == action]


def test_a_takeover_triggers_a_checkpoint_and_the_follow_up_locks(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_a_takeover_triggers_a_checkpoint_and_the_follow_up_locks(store, tmp_path))


async def _a_takeover_triggers_a_checkpoint_and_the_follow_up_locks(
    store: SecureStore, tmp_path: Path
) -> None:
    shift = await start_shift(store, tmp_path, POLICY)
    await shift.speak(1.0, 12)
    await shift.speak(-1.0, 8)
    failed = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert failed.trigger is CheckpointTrigger.CHANGE_WATCH
    assert failed.change_similarity == pytest.approx(0.0)
    # It judged the new voice only, from the suspected change on.
    assert failed.score == pytest.approx(0.0)
    await shift.speak(-1.0, 10)
    follow_up = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert follow_up.trigger is CheckpointTrigger.FOLLOW_UP
    # The failure that locks was decided on more speech, all of it after the first's.
    assert follow_up.net_speech_seconds == pytest.approx(POLICY.confirm_net_speech_seconds)
    assert failed.audio_end is not None and follow_up.audio_start is not None
    assert follow_up.audio_start >= failed.audio_end
    locked = await shift.until(ShiftEventKind.SHIFT_LOCKED)
    assert locked.shift.state is ShiftState.LOCKED
    # All within 30 s of the takeover, against 1,000 s for the random checkpoint.
    assert (locked.at - T0).total_seconds() <= 12 + 30
    assert [d["outcome"] for d in audited(store, AuditAction.SHIFT_VOICE_CHANGE)][:1] == [
        "SUSPECTED"
    ]
    checkpoints = audited(store, AuditAction.SHIFT_CHECKPOINT)
    assert [(d["trigger"], d["outcome"]) for d in checkpoints] == [
        ("CHANGE_WATCH", "REJECT"),
        ("FOLLOW_UP", "REJECT"),
    ]
    assert all(d["shift_id"] == locked.shift.shift_id for d in checkpoints)
    await shift.service.close()


def test_the_agent_streaming_triggers_nothing_and_the_schedule_holds(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_the_agent_streaming_triggers_nothing_and_the_schedule_holds(store, tmp_path))


async def _the_agent_streaming_triggers_nothing_and_the_schedule_holds(
    store: SecureStore, tmp_path: Path
) -> None:
    shift = await start_shift(store, tmp_path, replace(POLICY, mean_checkpoint_interval_seconds=60))
    await shift.speak(1.0, 130)
    kinds = shift.kinds()
    assert kinds == [
        (ShiftEventKind.STREAM_ATTACHED, None),
        (ShiftEventKind.CHECKPOINT_PASSED, CheckpointTrigger.SCHEDULED),
        (ShiftEventKind.CHECKPOINT_PASSED, CheckpointTrigger.SCHEDULED),
    ]
    assert audited(store, AuditAction.SHIFT_VOICE_CHANGE) == []
    await shift.service.close()


def test_with_the_watch_off_a_takeover_waits_for_the_random_checkpoint(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_with_the_watch_off_a_takeover_waits_for_the_random_checkpoint(store, tmp_path))


async def _with_the_watch_off_a_takeover_waits_for_the_random_checkpoint(
    store: SecureStore, tmp_path: Path
) -> None:
    shift = await start_shift(store, tmp_path, replace(POLICY, change_watch=False))
    await shift.speak(1.0, 12)
    await shift.speak(-1.0, 40)
    assert shift.kinds() == [(ShiftEventKind.STREAM_ATTACHED, None)]
    assert (await shift.service.get(shift.shift_id)).state is ShiftState.VERIFIED
    await shift.service.close()


def test_a_second_voice_is_reported_and_locks_only_by_policy(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_a_second_voice_is_reported_and_locks_only_by_policy(store, tmp_path))


async def _a_second_voice_is_reported_and_locks_only_by_policy(
    store: SecureStore, tmp_path: Path
) -> None:
    for locks in (False, True):
        shift = await start_shift(store, tmp_path, replace(POLICY, second_voice_locks=locks))
        await shift.speak(1.0, 12)
        await shift.speak(-1.0, 5)
        # Enough of the agent for the follow-up (8 s) and a look after it.
        await shift.speak(1.0, 16)
        second = await shift.until(ShiftEventKind.SECOND_VOICE)
        assert second.audio_start is not None and second.audio_end is not None
        assert second.audio_start < second.audio_end
        assert second.threshold == POLICY.change_watch_threshold
        state = (await shift.service.get(second.shift.shift_id)).state
        assert state is (ShiftState.LOCKED if locks else ShiftState.VERIFIED)
        if locks:
            await shift.until(ShiftEventKind.SHIFT_LOCKED)
            # Locked: the random checkpoint does not come.
            shift.clock.advance(2000)
            await asyncio.sleep(0.1)
            kinds = [kind for kind, _ in shift.kinds()]
            assert kinds[-1] is ShiftEventKind.SHIFT_LOCKED
        await shift.service.close()
    outcomes = [d["outcome"] for d in audited(store, AuditAction.SHIFT_SECOND_VOICE)]
    assert outcomes == ["REPORTED", "LOCKED"]


def test_a_random_checkpoints_failure_alone_is_not_followed_up_at_once(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_a_random_checkpoints_failure_alone_is_not_followed_up_at_once(store, tmp_path))


async def _a_random_checkpoints_failure_alone_is_not_followed_up_at_once(
    store: SecureStore, tmp_path: Path
) -> None:
    # A watch that suspects nothing (no similarity is below 0), random checkpoints every 60 s.
    policy = replace(POLICY, mean_checkpoint_interval_seconds=60.0, change_watch_threshold=0.0)
    shift = await start_shift(store, tmp_path, policy)
    await shift.speak(-1.0, 59)
    await shift.speak(-1.0, 1)
    failed = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert failed.trigger is CheckpointTrigger.SCHEDULED
    await shift.speak(-1.0, 30)
    assert shift.kinds()[-1] == (ShiftEventKind.CHECKPOINT_FAILED, CheckpointTrigger.SCHEDULED)
    await shift.speak(-1.0, 31)
    await shift.until(ShiftEventKind.SHIFT_LOCKED)
    assert [t for k, t in shift.kinds() if k is ShiftEventKind.CHECKPOINT_FAILED] == [
        CheckpointTrigger.SCHEDULED,
        CheckpointTrigger.SCHEDULED,
    ]
    await shift.service.close()


def test_the_check_that_could_lock_verifies_more_speech(store: SecureStore, tmp_path: Path) -> None:
    asyncio.run(_the_check_that_could_lock_verifies_more_speech(store, tmp_path))


async def _the_check_that_could_lock_verifies_more_speech(
    store: SecureStore, tmp_path: Path
) -> None:
    shift = await start_shift(store, tmp_path, POLICY)
    session = shift.service._sessions[shift.shift_id]
    needed = shift.service.net_speech_needed
    assert needed(session) == POLICY.checkpoint_net_speech_seconds
    session.record = replace(session.record, consecutive_failures=1)
    assert needed(session) == POLICY.confirm_net_speech_seconds
    # A policy that locks on one failure: every checkpoint could lock.
    shift.service.policy = replace(POLICY, max_consecutive_failures=1)
    session.record = replace(session.record, consecutive_failures=0)
    assert needed(session) == POLICY.confirm_net_speech_seconds
    # Never less than an ordinary checkpoint.
    shift.service.policy = replace(POLICY, confirm_net_speech_seconds=1.0)
    session.record = replace(session.record, consecutive_failures=1)
    assert needed(session) == POLICY.checkpoint_net_speech_seconds
    await shift.service.close()


def test_a_checkpoint_on_telephone_speech_waits_for_the_telephone_minimum(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_a_checkpoint_on_telephone_speech_waits_for_the_telephone_minimum(store, tmp_path))


async def _a_checkpoint_on_telephone_speech_waits_for_the_telephone_minimum(
    store: SecureStore, tmp_path: Path
) -> None:
    # Checkpoints verify 4 s, the telephone channel needs 5 s for a decision. The stream is
    # 16 kHz PCM, so its format says wideband; the fake voice carries nothing above 4 kHz,
    # so its speech is scored as telephone, and the checkpoint verifies 5 s, not 4.
    minimum = VerificationPolicy(min_net_speech_seconds_telephone=5.0)
    shift = await start_shift(store, tmp_path, POLICY, minimum)
    session = shift.service._sessions[shift.shift_id]
    needed = shift.service.net_speech_needed
    assert needed(session) == POLICY.checkpoint_net_speech_seconds == 4.0
    assert needed(session, Channel.TELEPHONE) == 5.0
    assert needed(session, Channel.WIDEBAND) == 4.0
    await shift.speak(-1.0, 12)
    failed = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert failed.trigger is CheckpointTrigger.CHANGE_WATCH
    assert failed.net_speech_seconds == pytest.approx(5.0)
    # The one that could lock verifies the confirmation's 8 s, above either minimum.
    await shift.speak(-1.0, 12)
    second = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert second.net_speech_seconds == pytest.approx(POLICY.confirm_net_speech_seconds)
    await shift.service.close()


def test_the_follow_up_judges_only_speech_after_the_failure_and_the_agent_passes_it(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(
        _the_follow_up_judges_only_speech_after_the_failure_and_the_agent_passes_it(store, tmp_path)
    )


async def _the_follow_up_judges_only_speech_after_the_failure_and_the_agent_passes_it(
    store: SecureStore, tmp_path: Path
) -> None:
    # Someone else speaks briefly (the watch triggers, the checkpoint fails), then the agent
    # again: the follow-up that could lock hears the agent only, none of the failed audio,
    # and passes; the shift is not locked and its failures start again from none.
    shift = await start_shift(store, tmp_path, POLICY)
    await shift.speak(1.0, 12)
    await shift.speak(-1.0, 5)
    failed = await shift.until(ShiftEventKind.CHECKPOINT_FAILED)
    assert failed.trigger is CheckpointTrigger.CHANGE_WATCH
    await shift.speak(1.0, 14)
    follow_up = await shift.until(ShiftEventKind.CHECKPOINT_PASSED)
    assert follow_up.trigger is CheckpointTrigger.FOLLOW_UP
    assert follow_up.net_speech_seconds == pytest.approx(POLICY.confirm_net_speech_seconds)
    assert failed.audio_end is not None and follow_up.audio_start is not None
    assert follow_up.audio_start >= failed.audio_end
    record = await shift.service.get(shift.shift_id)
    assert record.state is ShiftState.VERIFIED
    assert record.consecutive_failures == 0
    assert ShiftEventKind.SHIFT_LOCKED not in [kind for kind, _ in shift.kinds()]
    await shift.service.close()


T = TypeVar("T")


class BusyPool(InferencePool):
    """The inference pool, refusing everything while `busy` as a full queue does."""

    busy = False

    async def run(self, work: Callable[[], T]) -> T:
        if self.busy:
            raise CapacityError("the server is busy; retry in about 2.0 s", retry_after_seconds=2.0)
        return await super().run(work)


def _shift_work(metrics: Metrics) -> tuple[float, float, float]:
    """The change watch's looks compared and skipped as busy, and the checkpoint attempts
    deferred as busy, as a scrape of /metrics shows them."""
    samples = parse_metrics(metrics.exposition().decode())
    looks = "voxauth_change_watch_looks_total"
    return (
        metric(samples, looks, outcome="compared"),
        metric(samples, looks, outcome="skipped_busy"),
        metric(samples, "voxauth_checkpoint_attempts_deferred_busy_total"),
    )


def test_looks_and_checkpoint_attempts_the_busy_pool_refused_are_counted(
    store: SecureStore, tmp_path: Path
) -> None:
    asyncio.run(_looks_and_checkpoint_attempts_the_busy_pool_refused_are_counted(store, tmp_path))


async def _looks_and_checkpoint_attempts_the_busy_pool_refused_are_counted(
    store: SecureStore, tmp_path: Path
) -> None:
    # A random checkpoint at 60 s; a look due every 5 s of audio.
    policy = replace(POLICY, mean_checkpoint_interval_seconds=60.0)
    metrics, pool = Metrics(), BusyPool(InferenceLimits())
    shift = await start_shift(store, tmp_path, policy, pool=pool, telemetry=metrics)
    assert _shift_work(metrics) == (0, 0, 0)
    await shift.speak(1.0, 12)
    compared, skipped, deferred = _shift_work(metrics)
    assert compared >= 1 and (skipped, deferred) == (0, 0)
    # Busy: every look due in the next 20 s (one per 5 s) is skipped, and counted so.
    pool.busy = True
    await shift.speak(1.0, 20)
    assert _shift_work(metrics) == (compared, 4, 0)
    # Still busy when the checkpoint falls due (60 s): each try on new audio is deferred,
    # until its speech wait (60 s) ends without a decision.
    await shift.speak(1.0, 100)
    insufficient = await shift.until(ShiftEventKind.INSUFFICIENT_SPEECH)
    assert insufficient.trigger is CheckpointTrigger.SCHEDULED
    busy_compared, skipped, deferred = _shift_work(metrics)
    assert busy_compared == compared and skipped > 4 and deferred >= 30
    # The pool free again: looks are made, and no more are skipped.
    pool.busy = False
    await shift.speak(1.0, 12)
    after, *refused = _shift_work(metrics)
    assert after > compared and refused == [skipped, deferred]
    await shift.service.close()
