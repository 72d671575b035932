"""Console sessions: random ids found only by their hash, expiry, a bound on how many, and
the CSRF token compared in constant time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.api.console import sessions
from server.api.console.sessions import SESSION_LIFETIME, Sessions
from server.security.identity import CredentialSource, Identity, Role

NOW = datetime(2026, 12, 1, 9, tzinfo=UTC)
SAM = Identity("sam", frozenset({Role.SUPERVISOR}), CredentialSource.TOKEN)


def test_a_session_lasts_its_lifetime_and_ends_when_closed() -> None:
    store = Sessions()
    session_id, session = store.open(SAM, NOW)
    assert len(session_id) >= 43 and session.csrf_token != session_id
    assert store.find(session_id, NOW + SESSION_LIFETIME - timedelta(seconds=1)) == session
    assert store.find(session_id, NOW + SESSION_LIFETIME) is None
    store.close(session_id)
    assert store.find(session_id, NOW) is None


def test_ids_that_are_no_session_find_nothing() -> None:
    store = Sessions()
    session_id, session = store.open(SAM, NOW)
    # The id is kept only as its hash: neither the hash nor the CSRF token opens the session.
    for guess in ("", None, session.csrf_token, session_id[:-1], session_id + "x", "x" * 10_000):
        assert store.find(guess, NOW) is None


def test_the_csrf_token_must_match_exactly() -> None:
    _, session = Sessions().open(SAM, NOW)
    assert session.csrf_matches(session.csrf_token)
    for offered in (None, "", session.csrf_token[:-1], session.csrf_token.upper(), "é"):
        assert not session.csrf_matches(offered)


def test_sign_ins_cannot_grow_the_sessions_without_bound() -> None:
    store = Sessions()
    first, _ = store.open(SAM, NOW)
    later = [
        store.open(SAM, NOW + timedelta(seconds=n))[0] for n in range(1, sessions.MAX_SESSIONS + 1)
    ]
    # The oldest made room for the newest.
    assert store.find(first, NOW) is None
    assert all(store.find(s, NOW + timedelta(seconds=2)) is not None for s in later)
