"""Completed requests (the answers of retries with a request id), on every backend: kept until
they expire, told apart by request digest, committed with the unit they are recorded in,
sealed when they name an agent and erased with it."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import psycopg
import pytest

from server.runtime.requests import CompletedRequest, RecordedResponse, RequestKey
from server.storage.secure_store import SecureStore
from tests.contract.conftest import PostgresStorage, SqliteStorage, Storage
from tests.contract.samples import NOW, agent

KEY = RequestKey("hr-portal", "FinalizeEnrollment", "3f2c7a1e-0d4b-4c8e-9a51-1b6f0e2d7c90")
DIGEST = bytes(32)
OTHER_DIGEST = bytes([1]) * 32
RESPONSE = b"agent a1's voiceprint: the response of the first call"


def completion(
    agent_id: str = "a1", key: RequestKey = KEY, expires_in: timedelta = timedelta(hours=24)
) -> CompletedRequest:
    return CompletedRequest(key, DIGEST, RESPONSE, agent_id, NOW + expires_in)


def test_a_completion_answers_the_same_request_until_it_expires(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.record_request(completion())

    assert store.recorded_response(KEY, DIGEST, NOW) == RecordedResponse(True, RESPONSE)
    assert store.recorded_response(KEY, OTHER_DIGEST, NOW) == RecordedResponse(False, RESPONSE)
    assert store.recorded_response(KEY, DIGEST, NOW + timedelta(hours=24)) is None
    other_caller = RequestKey("another-portal", KEY.method, KEY.request_id)
    other_method = RequestKey(KEY.caller, "DeleteAgent", KEY.request_id)
    assert store.recorded_response(other_caller, DIGEST, NOW) is None
    assert store.recorded_response(other_method, DIGEST, NOW) is None


def test_expired_completions_are_forgotten_and_can_be_replaced(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.record_request(completion(expires_in=timedelta(hours=1)))
    later = NOW + timedelta(hours=2)

    assert store.forget_expired_requests(later) == 1
    assert store.recorded_response(KEY, DIGEST, NOW) is None
    store.record_request(
        CompletedRequest(KEY, OTHER_DIGEST, b"second", "a1", later + timedelta(hours=1))
    )
    assert store.recorded_response(KEY, OTHER_DIGEST, later) == RecordedResponse(True, b"second")


def test_a_completion_commits_with_its_unit_or_not_at_all(store: SecureStore) -> None:
    with pytest.raises(RuntimeError, match="crash"), store.unit_of_work() as unit:
        unit.create_agent(agent("a1"))
        unit.record_request(completion())
        raise RuntimeError("crash before the unit commits")
    assert store.recorded_response(KEY, DIGEST, NOW) is None

    with store.unit_of_work() as unit:
        unit.create_agent(agent("a1"))
        unit.record_request(completion())
    assert store.recorded_response(KEY, DIGEST, NOW) == RecordedResponse(True, RESPONSE)


def test_a_response_naming_an_agent_is_sealed_and_erased_with_it(
    storage: Storage, store: SecureStore
) -> None:
    store.create_agent(agent("a1"))
    store.record_request(completion())
    nobodys = RequestKey(KEY.caller, "DeleteAgent", "delete-a1")
    store.record_request(CompletedRequest(nobodys, DIGEST, b"", "", NOW + timedelta(hours=1)))

    assert storage_holds(storage, RESPONSE) is False
    store.delete_agent("a1")

    assert store.recorded_response(KEY, DIGEST, NOW) is None
    # The record of the erasure itself names nobody: it outlives the agent.
    assert store.recorded_response(nobodys, DIGEST, NOW) == RecordedResponse(True, b"")


def test_a_completion_for_an_agent_that_does_not_exist_is_not_kept(store: SecureStore) -> None:
    store.record_request(completion("nobody-here"))
    assert store.recorded_response(KEY, DIGEST, NOW) is None


def storage_holds(storage: Storage, plain: bytes) -> bool:
    """Whether any completed request row holds `plain` as it is: nothing in them names who
    asked, and a response that names an agent is sealed."""
    query = "SELECT request_handle, request_digest, response FROM completed_requests"
    rows: list[tuple[str | bytes, ...]]
    if isinstance(storage, PostgresStorage):
        with psycopg.connect(storage.conninfo) as connection:
            rows = connection.execute(query).fetchall()
    else:
        assert isinstance(storage, SqliteStorage)
        with sqlite3.connect(storage.path) as connection:
            rows = connection.execute(query).fetchall()
    assert rows
    values = [value.encode() if isinstance(value, str) else value for row in rows for value in row]
    names = [KEY.caller.encode(), KEY.request_id.encode()]
    return any(plain in value or any(name in value for name in names) for value in values)
