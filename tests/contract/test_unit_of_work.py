"""Units of work, on every backend: an action and its audit record commit together or not at
all, a unit reads its own writes, and the store refuses to be called from inside one."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.audit_actions import AuditAction
from server.errors import AgentNotFoundError
from server.records import (
    AssuranceRecord,
    AuditEvent,
    RevocationReason,
    ShiftRecord,
    ShiftState,
)
from server.security.audit import verify_log
from server.storage.secure_store import SecureStore
from tests.contract.conftest import AUDIT_KEY, Storage
from tests.contract.samples import NOW, agent, assert_same_voiceprint, utterance, voiceprint
from tests.fake_storage import CrashError, FailingBackend


def test_an_action_and_its_audit_record_commit_together(store: SecureStore) -> None:
    with store.unit_of_work() as unit:
        unit.create_agent(agent("a1"))
        unit.add_utterance(utterance("a1", 0), max_pending=5)
        # A unit reads what it has written.
        assert [u.utterance_id for u in unit.pending_utterances("a1")] == ["a1-u0"]
        unit.append_audit(AuditEvent("agent.create", "a1", "ok", NOW))

    assert store.get_agent("a1") == agent("a1")
    assert [e.action for e in store.audit_events("a1")] == ["agent.create"]
    assert verify_log(store, [AUDIT_KEY]).intact


def test_an_error_inside_a_unit_rolls_all_of_it_back(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.replace_voiceprint(voiceprint("a1", "old"), [])

    with pytest.raises(RuntimeError, match="crash"), store.unit_of_work() as unit:
        unit.replace_voiceprint(voiceprint("a1", "new"), [])
        unit.append_audit(AuditEvent("enrollment.finalize", "a1", "ok", NOW))
        raise RuntimeError("crash between the action and the end of the unit")

    assert_same_voiceprint(store.get_voiceprint("a1"), voiceprint("a1", "old"))
    assert store.audit_events() == []


def test_a_failed_audit_record_takes_its_action_back_with_it(storage: Storage) -> None:
    failing = FailingBackend()
    store = storage.open(failing=failing)
    try:
        store.create_agent(agent("a1"))
        store.replace_voiceprint(voiceprint("a1", "v"), [])
        failing.fail_on = "insert_audit_row"

        with pytest.raises(CrashError), store.unit_of_work() as unit:
            unit.delete_agent("a1")
            unit.append_audit(AuditEvent(AuditAction.AGENT_DELETE, "a1", "ok", NOW))

        # Not erased without its record: the agent and its voiceprint are all still there.
        assert store.get_agent("a1") == agent("a1")
        assert_same_voiceprint(store.get_voiceprint("a1"), voiceprint("a1", "v"))
        failing.fail_on = None
        assert store.audit_events() == []
        assert verify_log(store, [AUDIT_KEY]).intact
    finally:
        store.close()


def test_the_record_of_an_erasure_in_its_unit_names_the_agent(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.append_audit(AuditEvent("agent.create", "a1", "ok", NOW))

    with store.unit_of_work() as unit:
        unit.delete_agent("a1")
        unit.append_audit(AuditEvent(AuditAction.AGENT_DELETE, "a1", "ok", NOW))

    with pytest.raises(AgentNotFoundError):
        store.get_agent("a1")
    assert [(e.action, e.agent_id) for e in store.audit_events()] == [
        ("agent.create", ""),
        (AuditAction.AGENT_DELETE, "a1"),
    ]


def test_the_store_refuses_calls_from_inside_a_unit(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    with store.unit_of_work() as unit:
        # It would wait for the unit forever; it says so instead.
        with pytest.raises(RuntimeError, match="unit of work"):
            store.get_agent("a1")
        unit.append_audit(AuditEvent("verify", "a1", "ACCEPT", NOW))
    assert [e.action for e in store.audit_events("a1")] == ["verify"]


def test_a_revocation_commits_with_its_shift_change_and_records(storage: Storage) -> None:
    failing = FailingBackend()
    store = storage.open(failing=failing)
    try:
        store.create_agent(agent("a1"))
        shift = ShiftRecord("shift-1", "a1", "desk", ShiftState.VERIFIED, NOW, NOW)
        store.create_shift(shift)
        store.save_assurance(AssuranceRecord("shift-1", "a1", "jti-1", "a.b.c", NOW, NOW))
        locked = replace(shift, state=ShiftState.LOCKED)
        failing.fail_on = "insert_audit_row"

        with pytest.raises(CrashError), store.unit_of_work() as unit:
            assert unit.revoke_assurance("shift-1", RevocationReason.SHIFT_LOCKED, NOW)
            unit.update_shift(locked)
            unit.append_audit(AuditEvent(AuditAction.SHIFT_LOCK, "a1", "LOCKED", NOW))

        # Neither the revocation nor the lock without the record.
        assert store.get_revocation("jti-1") is None
        assert store.get_shift("shift-1") == shift
        failing.fail_on = None
        with store.unit_of_work() as unit:
            revocation = unit.revoke_assurance("shift-1", RevocationReason.SHIFT_LOCKED, NOW)
            # A unit reads its own revocation.
            assert unit.revoke_assurance("shift-1", RevocationReason.SHIFT_ENDED, NOW) is None
            unit.update_shift(locked)
            unit.append_audit(AuditEvent(AuditAction.SHIFT_LOCK, "a1", "LOCKED", NOW))
        assert store.get_revocation("jti-1") == revocation
        assert store.get_shift("shift-1") == locked
    finally:
        store.close()
