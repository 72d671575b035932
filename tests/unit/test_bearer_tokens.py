"""Bearer tokens expire, and the token file is read again when it changes: tokens are added
and revoked without a restart, and a broken file keeps the tokens last read. Against a real
grpc.aio server over TLS, behind the access interceptor (tests/unit/test_access.py's)."""

from __future__ import annotations

import asyncio
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from server.api.access import CredentialResolver
from server.api.tls import channel_credentials
from server.errors import ConfigurationError, UnauthenticatedError
from server.security.certificates import DevelopmentPki, create_pki
from server.security.identity import Role, TokenFile, TokenRegistry, mint_token
from server.storage.interface import AuditEvent
from server.tools.token_cli import main
from tests.clock import ManualClock
from tests.unit.test_access import GET_SHIFT, call, mutual_tls, serving

OK = (grpc.StatusCode.OK, b"crm-bridge")
UNAUTHENTICATED = (grpc.StatusCode.UNAUTHENTICATED, b"")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevelopmentPki:
    return create_pki(tmp_path_factory.mktemp("pki"))


def write(path: Path, *lines: str) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_an_expired_token_is_refused_and_audited(pki: DevelopmentPki, tmp_path: Path) -> None:
    clock = ManualClock()
    minted = mint_token("crm-bridge", Role.MFA, timedelta(days=1), now=clock.now())
    token_file = tmp_path / "tokens"
    write(token_file, minted.line)
    audited: list[AuditEvent] = []

    async def scenario() -> list[tuple[grpc.StatusCode, bytes]]:
        resolver = CredentialResolver(TokenFile(token_file, clock), clock)
        tls = mutual_tls(pki, require_client_auth=False)
        credentials = channel_credentials(pki.ca_certificate, bearer_token=minted.token)
        async with (
            serving(resolver, audited, tls) as address,
            grpc.aio.secure_channel(address, credentials) as channel,
        ):
            outcomes = [await call(channel, GET_SHIFT)]
            clock.advance(timedelta(days=1) - timedelta(seconds=1))
            outcomes.append(await call(channel, GET_SHIFT))
            clock.advance(1)
            outcomes.append(await call(channel, GET_SHIFT))
            return outcomes

    assert asyncio.run(scenario()) == [OK, OK, UNAUTHENTICATED]
    [refusal] = audited
    assert refusal.outcome == "UNAUTHENTICATED"
    assert refusal.details["reason"] == (
        "the bearer token of crm-bridge expired at 2026-11-03T08:00:00Z; "
        "mint a new one with `voxauth token`"
    )
    assert minted.token not in str(refusal)


def test_the_token_file_is_reloaded_without_a_restart(
    pki: DevelopmentPki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    first = mint_token("crm-bridge", Role.MFA, now=clock.now())
    second = mint_token("crm-bridge", Role.MFA, now=clock.now())
    token_file = tmp_path / "tokens"
    write(token_file, first.line)
    audited: list[AuditEvent] = []

    async def scenario() -> dict[str, tuple[tuple[grpc.StatusCode, bytes], ...]]:
        resolver = CredentialResolver(TokenFile(token_file, clock), clock)
        tls = mutual_tls(pki, require_client_auth=False)
        async with serving(resolver, audited, tls) as address:

            async def with_each_token() -> tuple[tuple[grpc.StatusCode, bytes], ...]:
                outcomes = []
                for minted in (first, second):
                    credentials = channel_credentials(pki.ca_certificate, bearer_token=minted.token)
                    async with grpc.aio.secure_channel(address, credentials) as channel:
                        outcomes.append(await call(channel, GET_SHIFT))
                return tuple(outcomes)

            seen = {"at start": await with_each_token()}
            write(token_file, first.line, second.line)
            seen["within the second"] = await with_each_token()
            clock.advance(1)
            seen["a line added"] = await with_each_token()
            write(token_file, second.line)
            clock.advance(1)
            seen["a line removed"] = await with_each_token()
            write(token_file, second.line, "sha256:not-a-hash hr mallory")
            clock.advance(1)
            seen["a broken file"] = await with_each_token()
            token_file.unlink()
            clock.advance(1)
            seen["no file"] = await with_each_token()
            return seen

    with caplog.at_level(logging.INFO, logger="server.security.identity"):
        seen = asyncio.run(scenario())
    assert seen == {
        "at start": (OK, UNAUTHENTICATED),
        # Checked at most once a second.
        "within the second": (OK, UNAUTHENTICATED),
        "a line added": (OK, OK),
        "a line removed": (UNAUTHENTICATED, OK),
        # The last good tokens stay in force.
        "a broken file": (UNAUTHENTICATED, OK),
        "no file": (UNAUTHENTICATED, OK),
    }
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2, "once per change"
    assert errors[0].startswith("token file not reloaded, the 1 tokens read before stay in force")
    assert f"{token_file}:2: expected `sha256:<64 hex digits>" in errors[0]
    assert "cannot read the token file" in errors[1]


def test_a_change_within_one_tick_of_the_file_clock_is_seen(tmp_path: Path) -> None:
    clock = ManualClock()
    first = mint_token("crm-bridge", Role.MFA, now=clock.now())
    second = mint_token("crm-bridge", Role.MFA, now=clock.now())
    token_file = tmp_path / "tokens"
    write(token_file, first.line)
    tokens = TokenFile(token_file, clock)
    stamp = token_file.stat().st_mtime_ns
    # The same size, and the same modification time, as a second write within one tick has.
    write(token_file, second.line)
    os.utime(token_file, ns=(stamp, stamp))
    clock.advance(1)
    assert tokens.identify(second.token, clock.now()).name == "crm-bridge"
    with pytest.raises(UnauthenticatedError):
        tokens.identify(first.token, clock.now())


def test_lines_say_when_they_expire_and_old_lines_keep_working(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    minted = mint_token("crm-bridge", Role.MFA, now=now)
    assert minted.line.endswith(" mfa crm-bridge expires=2027-01-31T08:00:00Z")  # 90 days
    assert minted.expires_at == now + timedelta(days=90)
    legacy = minted.line.removesuffix(" expires=2027-01-31T08:00:00Z")
    token_file = tmp_path / "tokens"
    write(token_file, legacy)
    with caplog.at_level(logging.WARNING, logger="server.security.identity"):
        tokens = TokenFile(token_file)
    far_future = now + timedelta(days=3650)
    assert tokens.identify(minted.token, far_future).name == "crm-bridge"
    assert "1 bearer token(s) in" in caplog.text and "re-mint them" in caplog.text

    for expiry in ("2027-01-31", "2027-01-31T08:00:00", "tomorrow"):
        write(token_file, f"{legacy} expires={expiry}")
        with pytest.raises(ConfigurationError, match=r"tokens:1: expires=.* is not a time"):
            TokenRegistry.load(token_file)
    write(token_file, f"{legacy} expires=2027-01-31T09:00:00+01:00")
    registry = TokenRegistry.load(token_file)
    with pytest.raises(UnauthenticatedError, match="expired at 2027-01-31T08:00:00Z"):
        registry.identify(minted.token, datetime(2027, 1, 31, 8, 0, tzinfo=UTC))


def test_the_token_command_writes_an_expiry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--name", "crm-bridge", "--role", "mfa", "--ttl", "7"]) == 0
    token_line, file_line = capsys.readouterr().out.splitlines()
    token = token_line.rsplit(" ", 1)[1]
    token_file = tmp_path / "tokens"
    write(token_file, file_line.removeprefix("line to add to the token file: "))
    registry = TokenRegistry.load(token_file)
    in_six_days = datetime.now(UTC) + timedelta(days=6)
    assert registry.identify(token, in_six_days).name == "crm-bridge"
    with pytest.raises(UnauthenticatedError, match="expired"):
        registry.identify(token, in_six_days + timedelta(days=1))
    for ttl in ("0", "-1", "nan", "inf", "99999"):
        with pytest.raises(SystemExit):
            main(["--name", "crm-bridge", "--role", "mfa", "--ttl", ttl])
    assert "--ttl: must be a number of days above 0" in capsys.readouterr().err
