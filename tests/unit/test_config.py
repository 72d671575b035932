"""Configuration from the environment: defaults, overrides, and clear errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.config import DEFAULT_THRESHOLD, ServerConfig
from server.errors import ConfigurationError
from server.security.config_audit import record_configuration
from server.security.crypto import VoiceprintCipher
from server.storage.sqlite import open_store


def test_defaults() -> None:
    config = ServerConfig.from_environment({})
    assert config.verification.threshold == DEFAULT_THRESHOLD
    assert config.enrollment.required_net_speech_seconds == 20.0
    assert config.verification.min_net_speech_seconds == 3.0
    assert config.audio.max_seconds == 60.0


def test_overrides() -> None:
    config = ServerConfig.from_environment(
        {
            "VOXAUTH_THRESHOLD": "0.5",
            "VOXAUTH_DB": "/data/v.db",
            "VOXAUTH_ENROLL_NET_SPEECH_SECONDS": "30",
            "VOXAUTH_WORKERS": "4",
        }
    )
    assert config.verification.threshold == 0.5
    # Enrollment consistency follows the verification threshold.
    assert config.enrollment.consistency_threshold == 0.5
    assert config.database_path == Path("/data/v.db")
    assert config.enrollment.required_net_speech_seconds == 30.0
    assert config.inference.workers == 4


@pytest.mark.parametrize(
    ("name", "value"),
    [("VOXAUTH_THRESHOLD", "high"), ("VOXAUTH_THRESHOLD", "-1"), ("VOXAUTH_WORKERS", "0")],
)
def test_bad_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        ServerConfig.from_environment({name: value})


def test_configuration_changes_are_audited(tmp_path: Path) -> None:
    store = open_store(tmp_path / "v.db", VoiceprintCipher(bytes(32)))
    now = datetime(2026, 11, 1, tzinfo=UTC)
    config = ServerConfig.from_environment({})
    assert record_configuration(store, config.as_json(), now)
    assert not record_configuration(store, config.as_json(), now)  # a plain restart
    changed = ServerConfig.from_environment({"VOXAUTH_LOCK_AFTER_FAILURES": "3"})
    assert record_configuration(store, changed.as_json(), now)
    events = [e for e in store.audit_events() if e.action == "configuration"]
    store.close()
    assert [e.outcome for e in events] == ["initial", "changed"]
    assert events[1].details["changed"] == ["shifts.max_consecutive_failures"]
    # Keys are read apart from the configuration: none can reach the audit log this way.
    secret = "c2VjcmV0LWtleS1tYXRlcmlhbC0zMi1ieXRlcy1sb25nIQ=="
    assert secret not in ServerConfig.from_environment({"VOXAUTH_KEY": secret}).as_json()
    assert json.loads(config.as_json()) == events[0].details["configuration"]
