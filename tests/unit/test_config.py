"""Configuration: defaults, overrides from the environment, checks however it is built, clear
errors, and `voxauth config`."""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from server.config import (
    DEFAULT_THRESHOLD,
    ClientSettings,
    EnrollmentPolicy,
    InferenceLimits,
    KeySettings,
    RetentionPolicy,
    ScoringPolicy,
    ServerConfig,
    ThrottlePolicy,
    VerificationPolicy,
    known_variables,
)
from server.errors import ConfigurationError
from server.security.config_audit import record_configuration
from server.security.crypto import VoiceprintCipher
from server.storage.sqlite import open_store
from server.tools.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, main


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
    assert config.database_path == "/data/v.db"
    assert config.enrollment.required_net_speech_seconds == 30.0
    assert config.inference.workers == 4


def test_the_store_is_a_sqlite_file_or_a_postgresql_uri_without_a_password() -> None:
    shared = "postgresql://voxauth@db.example:5432/voxauth?sslmode=verify-full"
    assert ServerConfig.from_environment({"VOXAUTH_DB": shared}).database_path == shared
    # The configuration is audited: a password belongs in PGPASSFILE, never in the URI.
    for with_password in (
        "postgresql://voxauth:hunter2@db.example/voxauth",
        "postgres://db.example/voxauth?password=hunter2",
    ):
        with pytest.raises(ConfigurationError, match="PGPASSFILE") as refused:
            ServerConfig.from_environment({"VOXAUTH_DB": with_password})
        # Nor is it quoted in the refusal.
        assert "hunter2" not in refused.value.message
        assert "***" in refused.value.message


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


def test_an_unknown_variable_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as raised:
        ServerConfig.from_environment({"VOXAUTH_TRESHOLD": "0.5", "VOXAUTH_WORKERS": "2"})
    message = raised.value.message
    assert "unknown environment variable VOXAUTH_TRESHOLD" in message
    known = message.split("the known ones are ")[1].split(", ")
    assert known == sorted(known_variables())
    assert {"VOXAUTH_THRESHOLD", "VOXAUTH_KEY", "VOXAUTH_MODEL_DIR", "VOXAUTH_SERVER"} <= set(known)
    # Every group refuses them alike, and other programs' variables are none of its business.
    with pytest.raises(ConfigurationError, match="VOXAUTH_TRESHOLD"):
        ClientSettings.from_environment({"VOXAUTH_TRESHOLD": "0.5"})
    assert ServerConfig.from_environment({"HOME": "/root"}) == ServerConfig()


def test_one_variable_sets_both_thresholds() -> None:
    # The one name two fields share: enrollment consistency follows the verification threshold.
    config = ServerConfig.from_environment({"VOXAUTH_THRESHOLD": "0.6"})
    assert config.verification.threshold == config.enrollment.consistency_threshold == 0.6


@pytest.mark.parametrize(
    "build",
    [
        lambda: replace(ServerConfig(), inference=replace(InferenceLimits(), workers=0)),
        lambda: replace(ThrottlePolicy(), free_failures=9, disable_after_failures=9),
        lambda: replace(ScoringPolicy(), target_fmr=0.7),
        lambda: replace(ServerConfig(), listen_address=50051),  # type: ignore[arg-type]
        lambda: VerificationPolicy(threshold=float("nan")),
        lambda: RetentionPolicy(voiceprint_ttl_days=0),
        lambda: replace(EnrollmentPolicy(), max_pending_utterances=0),
    ],
    ids=["workers", "throttle", "fmr", "type", "nan", "ttl", "no-default-variable"],
)
def test_values_are_checked_however_the_configuration_is_built(
    build: Callable[[], object],
) -> None:
    with pytest.raises(ConfigurationError):
        build()


def test_an_audio_budget_smaller_than_one_upload_is_refused() -> None:
    # 60 s of the largest kind of upload can hold 94 MiB; a budget below that refuses them all.
    with pytest.raises(ConfigurationError) as raised:
        ServerConfig.from_environment({"VOXAUTH_AUDIO_BUDGET_MIB": "64"})
    assert "VOXAUTH_AUDIO_BUDGET_MIB=64 is less than one upload of 60 s can hold (94 MiB)" in (
        raised.value.message
    )
    shorter = {"VOXAUTH_AUDIO_BUDGET_MIB": "64", "VOXAUTH_MAX_AUDIO_SECONDS": "30"}
    assert ServerConfig.from_environment(shorter).audio.budget_mib == 64


def test_a_refused_value_names_the_variable_and_the_field() -> None:
    with pytest.raises(ConfigurationError) as raised:
        replace(InferenceLimits(), workers=0)
    assert raised.value.message == (
        "VOXAUTH_WORKERS=0 (InferenceLimits.workers): must be at least 1"
    )
    with pytest.raises(ConfigurationError) as raised:
        KeySettings(key=b"raw key bytes")  # type: ignore[arg-type]
    assert "raw key" not in raised.value.message
    assert raised.value.message == "VOXAUTH_KEY (KeySettings.key): must be a str or None"


def test_empty_variables_mean_unset_except_for_text() -> None:
    config = ServerConfig.from_environment(
        {"VOXAUTH_WORKERS": "", "VOXAUTH_MODEL_DIR": "", "VOXAUTH_JWKS_LISTEN": ""}
    )
    assert config.inference.workers == InferenceLimits().workers
    assert config.model_dir is None
    assert config.mfa.jwks_listen_address == ""
    assert KeySettings.from_environment({"VOXAUTH_KEY": ""}).key is None


def test_voxauth_config_prints_the_effective_configuration_without_secrets(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("VOXAUTH_"):
            monkeypatch.delenv(name)
    key, previous = bytes(range(32)), bytes(range(1, 33))
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(key).decode())
    monkeypatch.setenv("VOXAUTH_PREVIOUS_KEYS", base64.b64encode(previous).decode())
    monkeypatch.setenv("VOXAUTH_TOKEN", "bearer-secret-4711")
    monkeypatch.setenv("VOXAUTH_WORKERS", "3")

    assert main(["config"]) == EXIT_OK

    out = capsys.readouterr().out
    shown = json.loads(out)
    assert shown["server"]["inference"]["workers"] == 3
    assert shown["server"]["database_path"] == "var/voxauth.db"
    assert shown["keys"]["key"] == "<redacted>"
    assert shown["keys"]["key_id"] == VoiceprintCipher(key).key_id
    assert shown["keys"]["previous_key_ids"] == [VoiceprintCipher(previous).key_id]
    assert shown["keys"]["key_file"] is None
    assert shown["client"]["token"] == "<redacted>"
    for secret in (base64.b64encode(key).decode(), base64.b64encode(previous).decode()):
        assert secret not in out
    assert "bearer-secret-4711" not in out


def test_voxauth_config_refuses_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOXAUTH_WORKER", "3")
    assert main(["config"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown environment variable VOXAUTH_WORKER " in err
    assert "VOXAUTH_WORKERS" in err


def test_serve_stops_at_start_on_an_unknown_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VOXAUTH_THROTTLE_DISABLE_AFTR", "10")
    assert main(["serve", "--insecure-dev"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown environment variable VOXAUTH_THROTTLE_DISABLE_AFTR" in err
    assert "VOXAUTH_THROTTLE_DISABLE_AFTER" in err


def test_client_commands_take_the_server_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{unused.getsockname()[1]}"
    monkeypatch.setenv("VOXAUTH_SERVER", address)
    monkeypatch.setenv("VOXAUTH_INSECURE", "1")
    assert main(["status", "agent-1", "--timeout", "2"]) == EXIT_UNREACHABLE
    assert address in capsys.readouterr().err
    monkeypatch.setenv("VOXAUTH_INSECURE", "yes")
    assert main(["status", "agent-1"]) == EXIT_USAGE
    assert "VOXAUTH_INSECURE='yes' must be 0 or 1" in capsys.readouterr().err
