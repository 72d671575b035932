"""The presentation-attack policy with a fake countermeasure: per-channel thresholds from the
calibration and the target BPCER, a suspected attack refused as a REJECT that counts toward the
throttle and is audited, monitor mode, enrollment refusing an attack with the reason, and the
countermeasure seeing the audio as it arrived (the speaker model sees the speech)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from enrollment.service import EnrollmentService
from models.countermeasure import CountermeasureEvidence
from models.embedder import Waveform
from models.manifest import AASIST_MANIFEST
from server.audit_actions import AuditAction
from server.config import AudioLimits, EnrollmentPolicy, PresentationAttackPolicy
from server.errors import ConfigurationError, ThrottledError
from server.pipeline.analysis import VoiceAnalyser
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding
from server.pipeline.presentation import (
    PadCalibration,
    PresentationDecision,
    default_pad_calibration_path,
)
from server.pipeline.speech import QualityThresholds
from server.security.crypto import VoiceprintCipher
from server.shifts.buffer import ShiftAudioBuffer, StreamFormat
from server.storage.interface import (
    AgentRecord,
    RecordingOrigin,
    ReplayFingerprint,
    Voiceprint,
)
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.verification.decision import Decision
from server.verification.service import VerificationService
from tests.clock import ManualClock
from tests.fakes import (
    AGENT_AUDIO,
    AGENT_VOICE,
    GENUINE_PAD_SCORE,
    MODEL_ID,
    SHIPPED_COUNTERMEASURE_ID,
    FakeCountermeasure,
    FakeEmbedder,
    FixedSegments,
    audio,
    fake_presentation,
    fake_verification,
    pcm16,
)
from tests.support import KEY

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
AGENT = "agent-7"
ATTACK_SCORE = -4.0
# In the fake world, loud audio is synthetic: the countermeasure scores it as an attack.
ATTACK_AUDIO = audio(0.5)


def fake_pad_score(waveform: Waveform) -> float:
    return ATTACK_SCORE if float(np.max(np.abs(waveform))) > 0.3 else GENUINE_PAD_SCORE


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecureStore]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    opened.create_agent(AgentRecord(AGENT, "Agent Seven", "HR-7", T0))
    opened.replace_voiceprint(Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, T0, 3, 20.0), [])
    yield opened
    opened.close()


def verification(
    store: SecureStore, tmp_path: Path, policy: PresentationAttackPolicy | None = None
) -> VerificationService:
    clock = ManualClock(T0)
    detector = fake_presentation(FakeCountermeasure(fake_pad_score), policy)
    return fake_verification(store, tmp_path / "scoring", clock.now, presentation=detector)


def test_thresholds_follow_the_channel_and_the_target_bpcer() -> None:
    at_5 = fake_presentation(FakeCountermeasure(), PresentationAttackPolicy(target_bpcer=0.05))
    at_20 = fake_presentation(FakeCountermeasure(), PresentationAttackPolicy(target_bpcer=0.2))
    # Calibration: wideband genuine N(1, 1), telephone N(0, 1).
    assert at_5.threshold(Channel.WIDEBAND) == pytest.approx(1.0 - 1.645, abs=1e-3)
    assert at_5.threshold(Channel.TELEPHONE) == pytest.approx(-1.645, abs=1e-3)
    assert at_20.threshold(Channel.WIDEBAND) == pytest.approx(1.0 - 0.842, abs=1e-3)
    # Each channel has its own target: by default 2% wideband, 5% telephone.
    default = fake_presentation(FakeCountermeasure())
    assert default.threshold(Channel.WIDEBAND) == pytest.approx(1.0 - 2.054, abs=1e-3)
    assert default.threshold(Channel.TELEPHONE) == pytest.approx(-1.645, abs=1e-3)
    telephone_at_20 = fake_presentation(
        FakeCountermeasure(), PresentationAttackPolicy(target_bpcer_telephone=0.2)
    )
    assert telephone_at_20.threshold(Channel.TELEPHONE) == pytest.approx(-0.842, abs=1e-3)
    assert telephone_at_20.threshold(Channel.WIDEBAND) == pytest.approx(1.0 - 2.054, abs=1e-3)
    # The same score is genuine on the telephone and an attack wideband.
    low = CountermeasureEvidence(-1.0, np.zeros(0))
    assert at_5.assess(low, Channel.TELEPHONE).decision is PresentationDecision.BONA_FIDE
    assert at_5.assess(low, Channel.WIDEBAND).decision is PresentationDecision.ATTACK
    assert at_5.assess(None, Channel.WIDEBAND).decision is PresentationDecision.NOT_ASSESSED


def test_a_suspected_attack_of_the_agents_voice_is_rejected_audited_and_counted(
    store: SecureStore, tmp_path: Path
) -> None:
    service = verification(store, tmp_path)
    genuine = service.verify(AGENT, AGENT_AUDIO)
    assert genuine.decision is Decision.ACCEPT
    assert genuine.presentation is not None
    assert genuine.presentation.decision is PresentationDecision.BONA_FIDE
    assert genuine.presentation.score == GENUINE_PAD_SCORE

    for _ in range(5):
        result = service.verify(AGENT, ATTACK_AUDIO)
        # The voice matches (the fake embeds the sign), the countermeasure refuses it.
        assert result.scoring is not None and result.scoring.accepted
        assert result.decision is Decision.REJECT
        assert result.presentation is not None
        assert result.presentation.decision is PresentationDecision.ATTACK
        # The fake's constant audio has nothing above 4 kHz: the telephone threshold.
        assert result.channel is Channel.TELEPHONE
        assert result.presentation.threshold == pytest.approx(-1.645, abs=1e-3)
    # Five failures: the throttle makes the next attempt wait, genuine or not.
    with pytest.raises(ThrottledError):
        service.verify(AGENT, AGENT_AUDIO)
    events = store.audit_events(AGENT)
    suspected = [e for e in events if e.action == AuditAction.PRESENTATION_ATTACK]
    assert len(suspected) == 5
    assert suspected[0].details["check"] == AuditAction.VERIFY.value
    assert suspected[0].details["pad_score"] == ATTACK_SCORE
    verifies = [e for e in events if e.action == AuditAction.VERIFY]
    assert [e.details["pad_decision"] for e in verifies] == ["BONA_FIDE"] + ["ATTACK"] * 5


def test_monitor_mode_reports_and_audits_but_refuses_nothing(
    store: SecureStore, tmp_path: Path
) -> None:
    service = verification(store, tmp_path, PresentationAttackPolicy(mode="monitor"))
    result = service.verify(AGENT, ATTACK_AUDIO)
    assert result.decision is Decision.ACCEPT
    assert result.presentation is not None
    assert result.presentation.decision is PresentationDecision.ATTACK
    assert not result.presentation.enforced
    actions = [e.action for e in store.audit_events(AGENT)]
    assert AuditAction.PRESENTATION_ATTACK in actions


def test_unknown_pad_mode_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="VOXAUTH_PAD_MODE"):
        PresentationAttackPolicy(mode="off")


def test_the_countermeasure_sees_the_audio_as_it_arrived_pauses_included() -> None:
    countermeasure = FakeCountermeasure()
    # Speech in the middle second of three: the embedder gets one second, PAD all three.
    analyser = VoiceAnalyser(
        FakeEmbedder(),
        FixedSegments([(16_000, 32_000)]),
        QualityThresholds(),
        AudioLimits(),
        fake_presentation(countermeasure),
    )
    sample = analyser.analyse_waveform(np.full(48_000, 0.1, np.float32), min_net_speech_seconds=0)
    assert len(sample.quality.speech) == 16_000
    assert countermeasure.scored == [48_000]


def test_a_checkpoint_stretch_holds_the_pauses_between_the_speech() -> None:
    buffer = ShiftAudioBuffer(StreamFormat.declared(AudioEncoding.PCM16LE, 16_000), 90.0)
    for second in range(4):
        buffer.append(pcm16(0.1, 1.0), at=float(second + 1))
    # Speech in the first and last 0.5 s of every analysed run of blocks.
    recent = buffer.recent_speech(FixedSegments([(0, 8_000), (56_000, 64_000)]), 1.0)
    assert recent is not None
    assert len(recent.speech) == 16_000
    assert recent.stretch is not None and len(recent.stretch) == 64_000


def test_an_enrollment_utterance_taken_for_an_attack_is_refused_with_the_reason(
    store: SecureStore,
) -> None:
    analyser = VoiceAnalyser(
        FakeEmbedder(),
        FixedSegments([(0, 64_000)]),
        QualityThresholds(),
        AudioLimits(),
        fake_presentation(FakeCountermeasure(fake_pad_score)),
    )
    service = EnrollmentService(store, analyser, EnrollmentPolicy(), ManualClock(T0).now)
    refused = service.add_utterance(AGENT, ATTACK_AUDIO)
    assert refused.record is None
    assert "presentation attack" in refused.rejection_reason
    assert refused.presentation is not None
    assert refused.presentation.decision is PresentationDecision.ATTACK
    kept = service.add_utterance(AGENT, AGENT_AUDIO)
    assert kept.record is not None
    assert kept.presentation is not None and not kept.presentation.decision.suspected
    actions = [e.action for e in store.audit_events(AGENT)]
    assert actions.count(AuditAction.PRESENTATION_ATTACK) == 1


def test_the_shipped_calibration_loads_for_the_shipped_backend_and_is_refused_for_another(
    tmp_path: Path,
) -> None:
    shipped = PadCalibration.load(default_pad_calibration_path(), SHIPPED_COUNTERMEASURE_ID)
    assert shipped.channels[Channel.WIDEBAND].count >= 50
    assert shipped.channels[Channel.TELEPHONE].count >= 50
    # Neither the raw checkpoint's scores nor another back-end's may use these thresholds.
    for other in (AASIST_MANIFEST.model_id, "another-countermeasure"):
        with pytest.raises(ConfigurationError, match="made for countermeasure"):
            PadCalibration.load(default_pad_calibration_path(), other)
    document = json.loads(default_pad_calibration_path().read_text())
    assert document["provenance"]["split"] == "calibration"
    broken = tmp_path / "pad.json"
    broken.write_text(json.dumps({**document, "channels": {}}))
    with pytest.raises(ConfigurationError, match="malformed"):
        PadCalibration.load(broken, SHIPPED_COUNTERMEASURE_ID)


def test_the_countermeasure_runs_beside_the_embedding_not_on_the_callers_thread() -> None:
    seen: list[str] = []

    def record_thread(waveform: Waveform) -> float:
        seen.append(threading.current_thread().name)
        return GENUINE_PAD_SCORE

    analyser = VoiceAnalyser(
        FakeEmbedder(),
        FixedSegments([(0, 32_000)]),
        QualityThresholds(),
        AudioLimits(),
        fake_presentation(FakeCountermeasure(record_thread)),
    )
    analyser.analyse_waveform(np.full(32_000, 0.1, np.float32), min_net_speech_seconds=0)
    assert seen and seen[0].startswith("pad")


def test_the_same_recording_played_again_is_refused_as_replay(
    store: SecureStore, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    service = fake_verification(
        store, tmp_path / "scoring", clock.now, replay=PresentationAttackPolicy()
    )
    # The fake embeds every agent recording alike: the second is the first played back.
    assert service.verify(AGENT, AGENT_AUDIO).decision is Decision.ACCEPT
    clock.advance(timedelta(minutes=5))
    replayed = service.verify(AGENT, AGENT_AUDIO)
    assert replayed.decision is Decision.REJECT
    assert replayed.presentation is not None
    assert replayed.presentation.decision is PresentationDecision.REPLAY
    [suspected] = [
        e for e in store.audit_events(AGENT) if e.action == AuditAction.PRESENTATION_ATTACK
    ]
    assert suspected.details["replay_of"] == "check"
    # Past the replay window the earlier check is forgotten.
    clock.advance(timedelta(days=31))
    store_checks = [f for f in store.fingerprints(AGENT) if f.origin.value == "check"]
    assert len(store_checks) == 2
    assert service.verify(AGENT, AGENT_AUDIO).decision is Decision.ACCEPT


def test_a_check_repeating_an_enrollment_utterance_is_a_replay(
    store: SecureStore, tmp_path: Path
) -> None:
    clock = ManualClock(T0)
    store.add_fingerprint(
        ReplayFingerprint(AGENT, MODEL_ID, RecordingOrigin.ENROLLMENT, T0, AGENT_VOICE),
        keep_after=T0,
        keep=10,
    )
    monitor = PresentationAttackPolicy(mode="monitor")
    service = fake_verification(store, tmp_path / "scoring", clock.now, replay=monitor)
    result = service.verify(AGENT, AGENT_AUDIO)
    # Monitor mode: reported, not refused.
    assert result.decision is Decision.ACCEPT
    assert result.presentation is not None
    assert result.presentation.decision is PresentationDecision.REPLAY
    assert not result.presentation.enforced
    enforcing = fake_verification(
        store, tmp_path / "scoring", clock.now, replay=PresentationAttackPolicy()
    )
    assert enforcing.verify(AGENT, AGENT_AUDIO).decision is Decision.REJECT
