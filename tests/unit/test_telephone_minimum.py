"""The telephone channel's own minimum of net speech for a decision
(VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS_TELEPHONE): which checks it refuses as too little
speech, on the fake voice (a shift's checkpoints: tests/unit/test_change_watch.py)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from server.audit_actions import AuditAction
from server.config import ServerConfig, VerificationPolicy
from server.errors import ConfigurationError
from server.pipeline.analysis import AudioInput
from server.pipeline.channel import Channel
from server.pipeline.decode import AudioEncoding, encode_mulaw
from server.pipeline.speech import QualityIssue
from server.security.crypto import VoiceprintCipher
from server.storage.interface import AgentRecord, Voiceprint
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.verification.decision import Decision
from server.verification.service import VerificationService
from tests.clock import ManualClock
from tests.fakes import AGENT_VOICE, MODEL_ID, fake_verification
from tests.support import KEY

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
AGENT = "agent-5"
POLICY = VerificationPolicy(min_net_speech_seconds=3.0, min_net_speech_seconds_telephone=5.0)


def wideband(seconds: float) -> AudioInput:
    """The fake agent's voice (a positive level) with a tone at 6 kHz: energy above the
    telephone band, so the service takes it for wideband speech."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    samples = 0.1 + 0.05 * np.sin(2 * np.pi * 6_000 * t)
    return AudioInput((samples * 32767).astype("<i2").tobytes(), AudioEncoding.PCM16LE, 16_000)


def telephone(seconds: float) -> AudioInput:
    """The fake agent's voice as a G.711 u-law call at 8 kHz."""
    samples = np.full(int(8_000 * seconds), 0.1, dtype=np.float32)
    return AudioInput(encode_mulaw(samples), AudioEncoding.MULAW, 8_000)


def relayed(seconds: float) -> AudioInput:
    """The same voice at 16 kHz with nothing above 4 kHz: a call recorded at 16 kHz."""
    samples = np.full(int(16_000 * seconds), 0.1 * 32767)
    return AudioInput(samples.astype("<i2").tobytes(), AudioEncoding.PCM16LE, 16_000)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SecureStore]:
    opened = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    opened.create_agent(AgentRecord(AGENT, "Agent Five", "HR-5", T0))
    opened.replace_voiceprint(
        Voiceprint(AGENT, MODEL_ID, AGENT_VOICE, T0, 3, 20.0, telephone_embedding=AGENT_VOICE),
        [],
    )
    yield opened
    opened.close()


@pytest.fixture
def service(store: SecureStore, tmp_path: Path) -> VerificationService:
    clock = ManualClock(start=T0)
    return fake_verification(store, tmp_path / "scoring", clock.now, verification_policy=POLICY)


def test_the_minimum_a_check_needs_depends_on_its_channel() -> None:
    assert POLICY.min_net_speech_for(telephone=False) == 3.0
    assert POLICY.min_net_speech_for(telephone=True) == 5.0
    # A telephone minimum below the general one does not lower it: an operator who raised
    # VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS keeps it on telephone checks too.
    raised = VerificationPolicy(min_net_speech_seconds=6.0, min_net_speech_seconds_telephone=5.0)
    assert raised.min_net_speech_for(telephone=True) == 6.0
    assert VerificationPolicy().min_net_speech_for(telephone=True) >= 3.0


def test_a_4_s_telephone_check_is_too_little_speech_and_a_4_s_wideband_check_is_decided(
    service: VerificationService, store: SecureStore
) -> None:
    for audio in (telephone(4.0), relayed(4.0)):
        refused = service.verify(AGENT, audio)
        assert refused.channel is Channel.TELEPHONE
        assert refused.decision is Decision.INCONCLUSIVE
        assert refused.quality.issues[0] is QualityIssue.TOO_LITTLE_SPEECH
        assert refused.quality.net_speech_seconds == pytest.approx(4.0)
        assert refused.min_net_speech_seconds == 5.0
        assert refused.scoring is None
    decided = service.verify(AGENT, wideband(4.0))
    assert decided.channel is Channel.WIDEBAND
    assert decided.decision is Decision.ACCEPT
    assert QualityIssue.TOO_LITTLE_SPEECH not in decided.quality.issues
    assert decided.min_net_speech_seconds == 3.0
    # The audit record names the minimum that refused the check.
    verifies = [e for e in store.audit_events(AGENT) if e.action == AuditAction.VERIFY]
    assert [e.outcome for e in verifies] == ["INCONCLUSIVE", "INCONCLUSIVE", "ACCEPT"]
    assert verifies[0].details["min_net_speech_seconds"] == 5.0
    assert verifies[0].details["channel"] == "telephone"
    assert "min_net_speech_seconds" not in verifies[2].details


def test_a_telephone_check_with_the_telephone_minimum_is_decided(
    service: VerificationService,
) -> None:
    for audio in (telephone(5.2), relayed(5.2)):
        result = service.verify(AGENT, audio)
        assert result.channel is Channel.TELEPHONE
        assert result.decision is Decision.ACCEPT
    # Under the general minimum, every channel is too little speech, as before.
    assert service.verify(AGENT, wideband(2.5)).decision is Decision.INCONCLUSIVE


def test_a_login_check_on_a_telephone_line_needs_the_telephone_minimum(
    service: VerificationService,
) -> None:
    login = service.verify(AGENT, telephone(4.0), action=AuditAction.SHIFT_LOGIN)
    assert login.decision is Decision.INCONCLUSIVE
    assert login.min_net_speech_seconds == 5.0
    # Decided nothing, so it counts for no throttling: a longer one is decided.
    later = service.verify(AGENT, telephone(6.0), action=AuditAction.SHIFT_LOGIN)
    assert later.decision is Decision.ACCEPT


@pytest.mark.parametrize("value", ["-1", "four", "nan"])
def test_a_bad_telephone_minimum_is_refused_at_start(value: str) -> None:
    variable = "VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS_TELEPHONE"
    with pytest.raises(ConfigurationError, match=variable):
        ServerConfig.from_environment({variable: value})


def test_the_telephone_minimum_is_read_from_the_environment() -> None:
    config = ServerConfig.from_environment(
        {"VOXAUTH_VERIFY_MIN_NET_SPEECH_SECONDS_TELEPHONE": "6.5"}
    )
    assert config.verification.min_net_speech_seconds_telephone == 6.5
    assert config.verification.min_net_speech_for(telephone=True) == 6.5
    assert config.verification.min_net_speech_for(telephone=False) == 3.0
