"""Configuration from the environment: defaults, overrides, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.config import DEFAULT_THRESHOLD, ServerConfig
from server.errors import ConfigurationError


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
