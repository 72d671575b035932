"""The Store contract, on every backend (tests/contract/conftest.py): records come back as
stored, embeddings reach the backend sealed and bound to their row, erasure removes everything
that names the agent, a failed write changes nothing, and concurrent writes all land."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from server.audit_actions import AuditAction
from server.errors import (
    AgentExistsError,
    AgentNotFoundError,
    CapacityError,
    ConfigurationError,
    ShiftNotFoundError,
    StorageError,
)
from server.records import (
    AgentRecord,
    AssuranceRecord,
    AssuranceRevocation,
    AuditEvent,
    RecordingOrigin,
    ReplayFingerprint,
    RevocationReason,
    ShiftCursor,
    ShiftRecord,
    ShiftState,
    StoreCensus,
    ThrottleState,
    UtteranceRecord,
)
from server.security.assurances import SigningKey, SigningKeyCipher
from server.security.audit import BreakKind, verify_log
from server.security.crypto import DataKey, VoiceprintCipher, sealing_key_id
from server.storage.sealing import KeyRing
from server.storage.secure_store import SecureStore
from tests.contract.conftest import AUDIT_KEY, CIPHER, KEY, Storage
from tests.contract.samples import (
    MODEL,
    NOW,
    agent,
    assert_same_voiceprint,
    utterance,
    voiceprint,
)
from tests.fake_storage import CrashError, FailingBackend


def test_create_and_get_agent(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    got = store.get_agent("a1")
    assert got == agent("a1")
    assert got.created_at.tzinfo is not None
    assert got.created_at.utcoffset() == timedelta(0)


def test_times_in_other_zones_come_back_as_the_same_instant_in_utc(store: SecureStore) -> None:
    local = datetime(2025, 3, 1, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    store.create_agent(AgentRecord("a1", "A", "c", local))
    got = store.get_agent("a1").created_at
    assert got == local
    assert got.tzinfo == UTC


def test_naive_times_are_refused(store: SecureStore) -> None:
    with pytest.raises(ValueError, match="naive"):
        store.create_agent(AgentRecord("a1", "A", "c", datetime(2025, 3, 1)))
    with pytest.raises(ValueError, match="naive"):
        store.append_audit(AuditEvent("verify", "", "ok", datetime(2025, 3, 1)))


def test_duplicate_agent(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    with pytest.raises(AgentExistsError):
        store.create_agent(replace(agent("a1"), display_name="Someone else"))
    assert store.get_agent("a1") == agent("a1")


def test_unknown_agent(store: SecureStore) -> None:
    with pytest.raises(AgentNotFoundError):
        store.get_agent("ghost")
    with pytest.raises(AgentNotFoundError):
        store.delete_agent("ghost")
    with pytest.raises(AgentNotFoundError):
        store.add_utterance(utterance("ghost", 1), max_pending=5)
    with pytest.raises(AgentNotFoundError):
        store.pending_utterances("ghost")
    with pytest.raises(AgentNotFoundError):
        store.get_voiceprint("ghost")
    with pytest.raises(AgentNotFoundError):
        store.replace_voiceprint(voiceprint("ghost", "v"), [])
    with pytest.raises(AgentNotFoundError):
        store.create_shift(ShiftRecord("s1", "ghost", "desk", ShiftState.VERIFIED, NOW, NOW))
    with pytest.raises(AgentNotFoundError):
        store.update_throttle_state("ghost", lambda state: state)


def test_add_list_and_remove_utterances(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.create_agent(agent("a2"))
    # Added out of order: listing is by time received.
    for n in (2, 1, 3):
        store.add_utterance(utterance("a1", n, telephone=n == 1), max_pending=5)
    store.add_utterance(utterance("a2", 1), max_pending=5)

    pending = store.pending_utterances("a1")
    assert [u.utterance_id for u in pending] == ["a1-u1", "a1-u2", "a1-u3"]
    expected = utterance("a1", 1, telephone=True)
    first = pending[0]
    assert first.embedding.dtype == np.float32
    np.testing.assert_array_equal(first.embedding, expected.embedding)
    assert first.telephone_embedding is not None and expected.telephone_embedding is not None
    np.testing.assert_array_equal(first.telephone_embedding, expected.telephone_embedding)
    assert first == UtteranceRecord(
        **{
            **vars(expected),
            "embedding": first.embedding,
            "telephone_embedding": first.telephone_embedding,
        }
    )
    assert pending[1].telephone_embedding is None

    # Another agent's ids are out of reach.
    store.remove_utterances("a1", ["a1-u2", "a2-u1"])
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["a1-u1", "a1-u3"]
    assert [u.utterance_id for u in store.pending_utterances("a2")] == ["a2-u1"]


def test_pending_utterances_are_capped(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    for n in range(3):
        store.add_utterance(utterance("a1", n), max_pending=3)
    with pytest.raises(CapacityError):
        store.add_utterance(utterance("a1", 3), max_pending=3)
    assert len(store.pending_utterances("a1")) == 3

    store.remove_utterances("a1", ["a1-u0"])
    store.add_utterance(utterance("a1", 3), max_pending=3)
    assert len(store.pending_utterances("a1")) == 3


def test_replace_voiceprint(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    assert store.get_voiceprint("a1") is None
    for n in range(4):
        store.add_utterance(utterance("a1", n), max_pending=10)

    first = voiceprint("a1", "first")
    assert store.replace_voiceprint(first, ["a1-u0", "a1-u1"]) is False
    assert_same_voiceprint(store.get_voiceprint("a1"), first)
    assert [u.utterance_id for u in store.pending_utterances("a1")] == ["a1-u2", "a1-u3"]

    second = voiceprint("a1", "second", utterance_count=2)
    assert store.replace_voiceprint(second, ["a1-u2", "a1-u3"]) is True
    assert_same_voiceprint(store.get_voiceprint("a1"), second)
    assert store.pending_utterances("a1") == []


def test_the_voiceprints_of_a_model(store: SecureStore) -> None:
    for agent_id, model_id in (("b", MODEL), ("a", MODEL), ("c", "another-model")):
        store.create_agent(agent(agent_id))
        store.replace_voiceprint(voiceprint(agent_id, agent_id, model_id=model_id), [])

    listed = store.voiceprints(MODEL)

    assert [v.agent_id for v in listed] == ["a", "b"]
    for stored in listed:
        assert_same_voiceprint(stored, voiceprint(stored.agent_id, stored.agent_id))
    assert store.voiceprints("unknown-model") == []


def test_retention_counts_from_enrollment_and_the_latest_use(store: SecureStore) -> None:
    for agent_id in ("used", "idle"):
        store.create_agent(agent(agent_id))
        store.replace_voiceprint(voiceprint(agent_id, agent_id), [])
    enrolled = voiceprint("used", "used").created_at
    idle = store.get_voiceprint("idle")
    assert idle is not None and idle.last_used_at == enrolled

    later = enrolled + timedelta(days=30)
    store.mark_voiceprint_used("used", later)
    store.mark_voiceprint_used("used", later - timedelta(days=1))  # never moves back
    store.mark_voiceprint_used("nobody", later)  # nothing to mark
    used = store.get_voiceprint("used")
    assert used is not None and used.last_used_at == later

    assert store.expire_voiceprints(unused_before=later) == ["idle"]
    assert store.get_voiceprint("idle") is None
    assert store.get_agent("idle") == agent("idle")  # the agent stays
    assert store.expire_voiceprints(unused_before=later) == []


def test_data_survives_reopening(storage: Storage) -> None:
    store = storage.open()
    store.create_agent(agent("a1"))
    store.add_utterance(utterance("a1", 1), max_pending=5)
    store.add_utterance(utterance("a1", 2), max_pending=5)
    print_ = voiceprint("a1", "v")
    store.replace_voiceprint(print_, ["a1-u1"])
    store.append_audit(AuditEvent("enrollment.finalize", "a1", "ok", NOW, {"utterances": 1}))
    store.close()

    reopened = storage.open()
    try:
        assert reopened.get_agent("a1") == agent("a1")
        assert_same_voiceprint(reopened.get_voiceprint("a1"), print_)
        [pending] = reopened.pending_utterances("a1")
        np.testing.assert_array_equal(pending.embedding, utterance("a1", 2).embedding)
        assert reopened.audit_events("a1") == [
            AuditEvent("enrollment.finalize", "a1", "ok", NOW, {"utterances": 1})
        ]
    finally:
        reopened.close()


def test_another_key_cannot_open_the_store(storage: Storage) -> None:
    store = storage.open()
    store.create_agent(agent("a1"))
    store.replace_voiceprint(voiceprint("a1", "v"), [])
    store.close()

    # Refused when the store opens (the server's start), naming the key that sealed them.
    with pytest.raises(ConfigurationError, match=CIPHER.key_id):
        storage.open(VoiceprintCipher(bytes(32)))


def test_a_blob_copied_to_another_agent_does_not_decrypt(
    storage: Storage, store: SecureStore
) -> None:
    for agent_id in ("victim", "attacker"):
        store.create_agent(agent(agent_id))
        store.replace_voiceprint(voiceprint(agent_id, agent_id), [])
    # Written behind the store's back, as someone with write access to the database could.
    backend = storage.backend()
    with backend.transaction("copy a voiceprint", write=True) as txn:
        source, target = txn.voiceprints(MODEL)
        txn.put_voiceprint(replace(target, sealed_embedding=source.sealed_embedding))
    backend.close()

    refused = []
    for agent_id in ("victim", "attacker"):
        try:
            store.get_voiceprint(agent_id)
        except StorageError as error:
            refused.append(error.message)
    [reason] = refused
    assert "another agent" in reason


def test_the_backend_holds_embeddings_only_sealed_under_the_agents_key(
    storage: Storage, store: SecureStore
) -> None:
    store.create_agent(agent("a1"))
    store.add_utterance(utterance("a1", 1, telephone=True), max_pending=5)
    store.replace_voiceprint(voiceprint("a1", "v"), [])
    plain = [utterance("a1", 1, telephone=True).embedding, voiceprint("a1", "v").embedding]

    backend = storage.backend()
    with backend.transaction("read sealed rows", write=False) as txn:
        [stored] = txn.voiceprints(MODEL)
        [pending] = txn.utterances(stored.agent_ref)
    backend.close()

    sealed = [
        pending.sealed_embedding,
        pending.sealed_telephone_embedding,
        stored.sealed_embedding,
        stored.sealed_telephone_embedding,
    ]
    assert len({sealing_key_id(blob) for blob in sealed if blob is not None}) == 1
    for blob in sealed:
        assert blob is not None
        # Under the agent's data key, not the service key.
        assert sealing_key_id(blob) not in CIPHER.known_key_ids
        for vector in plain:
            assert vector.tobytes() not in blob
    # What the service key seals: the agent's data key and the store's handle key.
    assert store.sealing_key_ids() == {CIPHER.key_id: 2}


def test_no_row_names_the_agent_in_clear(storage: Storage, store: SecureStore) -> None:
    person = agent("zelda-4711")
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ6ZWxkYS00NzExIn0.c2lnbmF0dXJl"
    store.create_agent(person)
    # Ids of its own (as the service makes them), not derived from the agent's.
    store.add_utterance(replace(utterance(person.agent_id, 1), utterance_id="u-1"), max_pending=5)
    store.replace_voiceprint(voiceprint(person.agent_id, "v"), [])
    store.create_shift(
        ShiftRecord("shift-1", person.agent_id, "desk", ShiftState.VERIFIED, NOW, NOW)
    )
    store.save_assurance(AssuranceRecord("shift-1", person.agent_id, "jti-1", token, NOW, NOW))
    store.update_throttle_state(person.agent_id, lambda _: ThrottleState(2, NOW))
    store.append_audit(
        AuditEvent("verify", person.agent_id, "ACCEPT", NOW, {"shift_id": "shift-1"})
    )

    backend = storage.backend()
    with backend.transaction("read every row", write=False) as txn:
        [stored] = txn.voiceprints(MODEL)
        ref = stored.agent_ref
        rows: list[object] = [*txn.agents(), stored, *txn.utterances(ref)]
        rows += [txn.shift("shift-1"), txn.assurance("shift-1"), txn.throttle_state(ref)]
        rows += [txn.agent_key_page("", 10), txn.audit_rows(0, 10)]
    backend.close()

    stored_text = repr(rows).encode()
    assert ref.encode() in stored_text
    for secret in (person.agent_id, person.display_name, person.consent_reference, token):
        assert secret.encode() not in stored_text


def test_delete_agent_erases_everything_that_names_it(storage: Storage, store: SecureStore) -> None:
    store.create_agent(agent("keep"))
    store.add_utterance(utterance("keep", 1), max_pending=5)
    store.create_agent(agent("doomed"))
    for n in range(3):
        store.add_utterance(utterance("doomed", n), max_pending=5)
    store.replace_voiceprint(voiceprint("doomed", "v"), ["doomed-u0"])
    shift = ShiftRecord("shift-1", "doomed", "desk-12", ShiftState.VERIFIED, NOW, NOW)
    store.create_shift(shift)
    store.save_assurance(AssuranceRecord("shift-1", "doomed", "jti-1", "a.b.c", NOW, NOW))
    store.revoke_assurance("shift-1", RevocationReason.SHIFT_ENDED, NOW)
    store.update_throttle_state("doomed", lambda _: ThrottleState(3, NOW))
    store.append_audit(AuditEvent("agent.create", "doomed", "ok", NOW))
    [created] = store.audit_records(0, 10)
    ref = created.entry.agent_ref

    store.delete_agent("doomed")

    with pytest.raises(AgentNotFoundError):
        store.get_agent("doomed")
    with pytest.raises(ShiftNotFoundError):
        store.get_shift("shift-1")
    assert store.get_assurance("shift-1") is None
    assert store.get_revocation("jti-1") is None
    assert [u.utterance_id for u in store.pending_utterances("keep")] == ["keep-u1"]
    backend = storage.backend()
    with backend.transaction("look for the erased agent", write=False) as txn:
        assert len(txn.agents()) == len(txn.agent_key_page("", 10)) == 1
        assert txn.utterances(ref) == []
        assert txn.voiceprint(ref) is None
        assert txn.shift("shift-1") is None
        assert txn.assurance("shift-1") is None
        assert txn.revocation("jti-1") is None
        assert txn.throttle_state(ref) == ThrottleState()
    backend.close()
    # The agent's audit records stay, but nothing links them to it any more.
    assert store.audit_events("doomed") == []
    assert [(e.action, e.agent_id) for e in store.audit_events()] == [("agent.create", "")]


def test_erasure_destroys_the_agents_data_key(storage: Storage, store: SecureStore) -> None:
    store.create_agent(agent("keep"))
    store.create_agent(agent("doomed"))
    store.add_utterance(utterance("doomed", 1, telephone=True), max_pending=5)
    store.replace_voiceprint(voiceprint("doomed", "v"), [])
    store.create_shift(ShiftRecord("shift-1", "doomed", "desk", ShiftState.VERIFIED, NOW, NOW))
    store.save_assurance(AssuranceRecord("shift-1", "doomed", "jti-1", "a.b.c", NOW, NOW))
    backend = storage.backend()
    with backend.transaction("copy the agent's sealed rows", write=False) as txn:
        # What a copy of the database taken now (a backup, old log frames) would hold.
        [stored] = txn.voiceprints(MODEL)
        assurance = txn.assurance("shift-1")
        assert assurance is not None
        sealed = [stored.sealed_embedding, assurance.sealed_token]
        sealed += [blob.sealed_embedding for blob in txn.utterances(stored.agent_ref)]
        sealed += [row.sealed_identity for row in txn.agents()]
        keys_before = {row.wrapped_key for row in txn.agent_key_page("", 10)}

    store.delete_agent("doomed")

    with backend.transaction("look for its key", write=False) as txn:
        keys = KeyRing.load(txn, CIPHER, may_create=False)
        remaining = txn.agent_key_page("", 10)
        open_with = {keys.agent_key(row.agent_handle, row.wrapped_key).key_id for row in remaining}
    backend.close()
    assert len(remaining) == 1 and {row.wrapped_key for row in remaining} < keys_before
    # Of the agents' rows copied before, only the other agent's identity is under a key that
    # still exists; everything of the erased agent is under a key nothing holds any more.
    opened = [blob for blob in sealed if sealing_key_id(blob) in open_with | CIPHER.known_key_ids]
    assert len(opened) == 1
    assert store.get_agent("keep") == agent("keep")


def test_swapped_pseudonyms_are_found(storage: Storage, store: SecureStore) -> None:
    for agent_id in ("ann", "bob"):
        store.create_agent(agent(agent_id))
        store.append_audit(AuditEvent("verify", agent_id, "REJECT", NOW))
    assert store.attribution_faults() == []
    assert verify_log(store, [AUDIT_KEY]).intact
    # Each agent's pseudonym is sealed with its identity: moving the identities between the
    # agents' rows would make each agent's records read as the other's.
    backend = storage.backend()
    with backend.transaction("swap the pseudonyms", write=True) as txn:
        first, second = txn.agents()
        txn.delete_agent(first.agent_handle, "")
        txn.delete_agent(second.agent_handle, "")
        txn.insert_agent(replace(first, sealed_identity=second.sealed_identity))
        txn.insert_agent(replace(second, sealed_identity=first.sealed_identity))
    backend.close()

    faults = store.attribution_faults()
    assert len(faults) == 2 and all("identity" in fault for fault in faults)
    report = verify_log(store, [AUDIT_KEY])
    assert report.first_break is not None
    assert report.first_break.kind is BreakKind.REATTRIBUTED
    assert report.records == 2
    with pytest.raises(StorageError, match="identity"):
        store.audit_events("ann")


def test_a_failure_inside_a_write_changes_nothing(storage: Storage) -> None:
    failing = FailingBackend()
    store = storage.open(failing=failing)
    try:
        store.create_agent(agent("a1"))
        old = voiceprint("a1", "old")
        store.replace_voiceprint(old, [])
        for n in range(3):
            store.add_utterance(utterance("a1", n), max_pending=5)

        # The new voiceprint is written first; the failure strikes when the consumed
        # utterances are being discarded.
        failing.fail_on = "delete_utterances"
        with pytest.raises(CrashError):
            store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0", "a1-u1"])

        assert_same_voiceprint(store.get_voiceprint("a1"), old)
        assert [u.utterance_id for u in store.pending_utterances("a1")] == [
            "a1-u0",
            "a1-u1",
            "a1-u2",
        ]
        # The store is still usable once the fault is gone.
        failing.fail_on = None
        assert store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0", "a1-u1"]) is True
        assert_same_voiceprint(store.get_voiceprint("a1"), voiceprint("a1", "new"))
    finally:
        store.close()


def test_failed_encryption_changes_nothing(
    store: SecureStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.create_agent(agent("a1"))
    old = voiceprint("a1", "old")
    store.replace_voiceprint(old, [])
    store.add_utterance(utterance("a1", 0), max_pending=5)

    def broken(*_: object, **__: object) -> bytes:
        raise RuntimeError("cipher failed")

    monkeypatch.setattr(DataKey, "encrypt_embedding", broken)
    with pytest.raises(RuntimeError):
        store.replace_voiceprint(voiceprint("a1", "new"), ["a1-u0"])
    monkeypatch.undo()

    assert_same_voiceprint(store.get_voiceprint("a1"), old)
    assert len(store.pending_utterances("a1")) == 1


def test_concurrent_writes_all_land(store: SecureStore) -> None:
    threads = 8
    per_thread = 6
    store.create_agent(agent("shared"))
    start = threading.Barrier(threads)

    def work(t: int) -> int:
        start.wait()
        own = f"agent-{t}"
        store.create_agent(agent(own))
        capped = 0
        for n in range(per_thread):
            store.add_utterance(utterance(own, n), max_pending=per_thread)
            store.append_audit(AuditEvent("enrollment.add", own, "ok", NOW, {"n": n}))
            try:
                store.add_utterance(utterance("shared", t * per_thread + n), max_pending=10)
            except CapacityError:
                capped += 1
        store.replace_voiceprint(voiceprint(own, own), [f"{own}-u0"])
        return capped

    with ThreadPoolExecutor(threads) as pool:
        capped = sum(pool.map(work, range(threads)))

    for t in range(threads):
        own = f"agent-{t}"
        assert len(store.pending_utterances(own)) == per_thread - 1
        assert_same_voiceprint(store.get_voiceprint(own), voiceprint(own, own))
        assert [e.details["n"] for e in store.audit_events(own)] == list(range(per_thread))
    # The cap holds under contention: exactly 10 shared utterances got in.
    assert len(store.pending_utterances("shared")) == 10
    assert capped == threads * per_thread - 10


def test_shifts(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    shift = ShiftRecord("shift-1", "a1", "desk-12", ShiftState.UNVERIFIED, NOW, NOW)
    store.create_shift(shift)
    assert store.get_shift("shift-1") == shift

    ended = replace(
        shift,
        state=ShiftState.ENDED,
        updated_at=NOW + timedelta(hours=8),
        ended_at=NOW + timedelta(hours=8),
        consecutive_failures=1,
        checkpoints_passed=30,
        checkpoints_failed=2,
        checkpoints_insufficient=4,
    )
    store.update_shift(ended)
    assert store.get_shift("shift-1") == ended
    with pytest.raises(ShiftNotFoundError):
        store.get_shift("shift-2")
    with pytest.raises(ShiftNotFoundError):
        store.update_shift(replace(ended, shift_id="shift-2"))


def test_throttle_state_updates_atomically(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    failed = ThrottleState(2, NOW)
    assert store.update_throttle_state("a1", lambda _: failed) == ThrottleState()
    assert store.update_throttle_state("a1", lambda state: state) == failed

    def refuse(state: ThrottleState) -> ThrottleState:
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        store.update_throttle_state("a1", refuse)
    disabled = ThrottleState(50, NOW, NOW)
    assert store.update_throttle_state("a1", lambda _: disabled) == failed
    assert store.update_throttle_state("a1", lambda _: ThrottleState()) == disabled
    assert store.update_throttle_state("a1", lambda state: state) == ThrottleState()


def test_signing_keys_and_assurances(store: SecureStore) -> None:
    cipher = SigningKeyCipher(KEY)
    first, second = (cipher.seal(SigningKey.generate(NOW + timedelta(minutes=n))) for n in range(2))
    store.save_signing_keys([first, second])
    assert sorted(store.load_signing_keys(), key=lambda k: k.kid) == sorted(
        [first, second], key=lambda k: k.kid
    )
    store.save_signing_keys([second])
    assert store.load_signing_keys() == [second]
    # The signing key and the store's handle key.
    assert store.sealing_key_ids() == {CIPHER.key_id: 2}

    store.create_agent(agent("a1"))
    store.create_shift(ShiftRecord("shift-1", "a1", "desk", ShiftState.VERIFIED, NOW, NOW))
    assert store.get_assurance("shift-1") is None
    issued = AssuranceRecord("shift-1", "a1", "jti-1", "a.b.c", NOW, NOW + timedelta(hours=8))
    store.save_assurance(issued)
    renewed = replace(issued, token_id="jti-2", token="d.e.f", issued_at=NOW + timedelta(hours=1))
    store.save_assurance(renewed)
    assert store.get_assurance("shift-1") == renewed


def test_revoking_an_assurance(storage: Storage, store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.create_shift(ShiftRecord("shift-1", "a1", "desk", ShiftState.VERIFIED, NOW, NOW))
    # No assurance yet: nothing to revoke.
    assert store.revoke_assurance("shift-1", RevocationReason.SHIFT_LOCKED, NOW) is None
    assert store.revoke_assurance("no-such-shift", RevocationReason.SHIFT_ENDED, NOW) is None

    first = AssuranceRecord("shift-1", "a1", "jti-1", "a.b.c", NOW, NOW + timedelta(hours=8))
    store.save_assurance(first)
    locked_at = NOW + timedelta(minutes=5)
    locked = store.revoke_assurance("shift-1", RevocationReason.SHIFT_LOCKED, locked_at)
    assert locked == AssuranceRevocation(
        "jti-1", "shift-1", RevocationReason.SHIFT_LOCKED, locked_at
    )
    assert store.get_revocation("jti-1") == locked
    # The first revocation stands.
    assert store.revoke_assurance("shift-1", RevocationReason.SHIFT_ENDED, NOW) is None
    assert store.get_revocation("jti-1") == locked

    # A newer assurance of the shift stands on its own; the earlier one stays revoked.
    renewed = replace(first, token_id="jti-2", token="d.e.f", issued_at=locked_at)
    store.save_assurance(renewed)
    assert store.get_assurance("shift-1") == renewed
    assert store.get_revocation("jti-2") is None
    ended = store.revoke_assurance(
        "shift-1", RevocationReason.SHIFT_ENDED, NOW + timedelta(hours=1)
    )
    assert ended is not None and ended.token_id == "jti-2"
    assert store.get_revocation("jti-1") == locked
    assert store.get_revocation("unknown-jti") is None

    # Kept as stored, in another connection too.
    store.close()
    reopened = storage.open()
    try:
        assert reopened.get_revocation("jti-1") == locked
        assert reopened.get_revocation("jti-2") == ended
    finally:
        reopened.close()


def test_audit_log(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    events = [
        AuditEvent("agent.create", "a1", "ok", NOW),
        AuditEvent("verify", "a2", "REJECT", NOW, {"score": 0.31, "ids": ["x", "y"]}),
        AuditEvent("verify", "a1", "ACCEPT", NOW + timedelta(seconds=1), {"score": 0.82}),
    ]
    for event in events:
        store.append_audit(event)
    assert store.audit_events() == events
    assert store.audit_events("a1") == [events[0], events[2]]
    assert store.audit_events("a2") == [events[1]]
    assert store.audit_events("nobody") == []
    assert store.latest_audit_event(AuditAction.VERIFY) == events[2]
    assert store.latest_audit_event(AuditAction.SHIFT_START) is None


@pytest.mark.parametrize(
    "details",
    [
        {"embedding": np.zeros(192, np.float32)},
        {"nested": {"raw": b"\x00\x01"}},
        {"list": [bytearray(b"x")]},
        {"as_list": [0.1] * 192},
        {"not_json": object()},
        {"nan": float("nan")},
    ],
)
def test_audit_refuses_what_could_be_biometric(
    store: SecureStore, details: dict[str, object]
) -> None:
    with pytest.raises(ValueError):
        store.append_audit(AuditEvent("verify", "a1", "ok", NOW, details))
    assert store.audit_events() == []


def test_closed_store_raises_storage_error(store: SecureStore) -> None:
    store.close()
    with pytest.raises(StorageError):
        store.get_agent("a1")


def fingerprint(
    agent_id: str, at: datetime, origin: RecordingOrigin = RecordingOrigin.CHECK
) -> ReplayFingerprint:
    vector = np.random.default_rng(int(at.timestamp())).normal(size=4).astype(np.float32)
    return ReplayFingerprint(agent_id, MODEL, origin, at, vector / np.linalg.norm(vector))


def test_replay_fingerprints_are_sealed_bounded_and_erased_with_the_agent(
    storage: Storage, store: SecureStore
) -> None:
    store.create_agent(agent("keep"))
    store.create_agent(agent("doomed"))
    companion = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    enrolled = replace(
        fingerprint("doomed", NOW, RecordingOrigin.ENROLLMENT), telephone_embedding=companion
    )
    store.add_fingerprint(enrolled, keep_after=NOW - timedelta(days=999), keep=10)
    window = timedelta(days=30)
    for day in range(5):
        at = NOW + timedelta(days=day * 10)
        # Checks older than the window and beyond the newest 3 go as new ones come.
        store.add_fingerprint(fingerprint("doomed", at), keep_after=at - window, keep=3)
    store.add_fingerprint(fingerprint("keep", NOW), keep_after=NOW - window, keep=3)

    kept = store.fingerprints("doomed")
    assert [(f.origin, f.recorded_at) for f in kept] == [
        (RecordingOrigin.ENROLLMENT, NOW),
        (RecordingOrigin.CHECK, NOW + timedelta(days=20)),
        (RecordingOrigin.CHECK, NOW + timedelta(days=30)),
        (RecordingOrigin.CHECK, NOW + timedelta(days=40)),
    ]
    assert np.array_equal(kept[0].embedding, enrolled.embedding)
    assert kept[0].telephone_embedding is not None
    assert np.array_equal(kept[0].telephone_embedding, companion)
    store.replace_voiceprint(voiceprint("doomed", "v"), [])
    backend = storage.backend()
    with backend.transaction("read sealed rows", write=False) as txn:
        [stored] = txn.voiceprints(MODEL)
        rows = txn.fingerprints(stored.agent_ref)
    assert len(rows) == 4
    for row in rows:
        # Sealed under the agent's data key, the vectors nowhere in clear.
        assert sealing_key_id(row.sealed_embedding) not in CIPHER.known_key_ids
        assert all(f.embedding.tobytes() not in row.sealed_embedding for f in kept)

    store.delete_agent("doomed")

    with backend.transaction("look for its rows", write=False) as txn:
        assert txn.fingerprints(stored.agent_ref) == []
    backend.close()
    with pytest.raises(AgentNotFoundError):
        store.fingerprints("doomed")
    assert len(store.fingerprints("keep")) == 1


def test_expiring_a_voiceprint_erases_the_agents_fingerprints(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.replace_voiceprint(voiceprint("a1", "v"), [])
    for origin in RecordingOrigin:
        store.add_fingerprint(
            fingerprint("a1", NOW, origin), keep_after=NOW - timedelta(days=1), keep=5
        )
    assert len(store.fingerprints("a1")) == 2
    assert store.expire_voiceprints(NOW + timedelta(days=1)) == ["a1"]
    assert store.fingerprints("a1") == []


def test_agent_overviews_list_every_agent_in_id_order_with_its_enrollment(
    store: SecureStore,
) -> None:
    for agent_id in ("b2", "a1", "c3"):
        store.create_agent(agent(agent_id))
    store.add_utterance(utterance("a1", 1), max_pending=10)
    store.add_utterance(utterance("a1", 2), max_pending=10)
    store.replace_voiceprint(voiceprint("c3", "c3-vp"), [])
    overviews = store.agent_overviews()
    assert [o.agent for o in overviews] == [agent("a1"), agent("b2"), agent("c3")]
    a1, b2, c3 = overviews
    assert (a1.pending_utterances, a1.voiceprint) == (2, None)
    assert a1.pending_net_speech_seconds == pytest.approx(11.0)
    assert (b2.pending_utterances, b2.voiceprint) == (0, None)
    assert_same_voiceprint(c3.voiceprint, voiceprint("c3", "c3-vp"))
    assert c3.voiceprint is not None and c3.voiceprint.last_used_at is not None
    # An erased agent leaves the listing with everything it had.
    store.delete_agent("a1")
    assert [o.agent.agent_id for o in store.agent_overviews()] == ["b2", "c3"]


def test_list_shifts_pages_latest_first_and_filters_by_state(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    store.create_agent(agent("a2"))
    states = [ShiftState.VERIFIED, ShiftState.LOCKED, ShiftState.ENDED, ShiftState.LOCKED]
    made = []
    for n, state in enumerate(states * 3):
        # Two shifts share each start time: ties go by shift id, so no page repeats or skips.
        started = NOW + timedelta(minutes=n // 2)
        made.append(ShiftRecord(f"s{n:02d}", f"a{n % 2 + 1}", "desk", state, started, started))
        store.create_shift(made[-1])
    newest_first = sorted(made, key=lambda s: (s.started_at, s.shift_id), reverse=True)

    pages, before = [], None
    while page := store.list_shifts(limit=5, before=before):
        pages.append(page)
        before = ShiftCursor.after(page[-1])
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [s for p in pages for s in p] == newest_first

    locked = store.list_shifts({ShiftState.LOCKED}, limit=100)
    assert locked == [s for s in newest_first if s.state is ShiftState.LOCKED]
    both = store.list_shifts({ShiftState.LOCKED, ShiftState.ENDED}, limit=100)
    assert {s.state for s in both} == {ShiftState.LOCKED, ShiftState.ENDED} and len(both) == 9

    # An erased agent's shifts are gone from the list with it.
    store.delete_agent("a1")
    assert {s.agent_id for s in store.list_shifts(limit=100)} == {"a2"}


def test_throttle_state_reads_without_writing(store: SecureStore) -> None:
    store.create_agent(agent("a1"))
    assert store.throttle_state("a1") == ThrottleState()
    disabled = ThrottleState(50, NOW, NOW)
    store.update_throttle_state("a1", lambda _: disabled)
    assert store.throttle_state("a1") == disabled
    with pytest.raises(AgentNotFoundError):
        store.throttle_state("ghost")


def test_the_census_counts_open_shifts_by_state_and_throttled_agents(store: SecureStore) -> None:
    assert store.census(5) == StoreCensus(
        {
            ShiftState.VERIFIED: 0,
            ShiftState.UNVERIFIED: 0,
            ShiftState.LOCKED: 0,
            ShiftState.NOT_ENROLLED: 0,
        },
        0,
        0,
    )
    for n, state in enumerate(
        [ShiftState.VERIFIED, ShiftState.VERIFIED, ShiftState.LOCKED, ShiftState.ENDED]
    ):
        store.create_agent(agent(f"a{n}"))
        store.create_shift(ShiftRecord(f"s{n}", f"a{n}", "desk", state, NOW, NOW))
    store.update_throttle_state("a0", lambda _: ThrottleState(4, NOW))  # not yet delayed
    store.update_throttle_state("a1", lambda _: ThrottleState(5, NOW))
    store.update_throttle_state("a2", lambda _: ThrottleState(50, NOW, disabled_at=NOW))

    census = store.census(5)

    assert census.open_shifts == {
        ShiftState.VERIFIED: 2,
        ShiftState.UNVERIFIED: 0,
        ShiftState.LOCKED: 1,
        ShiftState.NOT_ENROLLED: 0,
    }
    assert (census.agents_delayed, census.agents_disabled) == (1, 1)


def test_audit_listeners_hear_only_of_committed_records(store: SecureStore) -> None:
    heard: list[AuditEvent] = []
    store.on_audit(heard.append)

    def failing(event: AuditEvent) -> None:
        raise ZeroDivisionError("a listener's bug")

    store.on_audit(failing)  # harms neither the writer nor the other listeners
    store.create_agent(agent("a1"))
    committed = AuditEvent("verify", "a1", "ACCEPT", NOW, {"channel": "wideband"})

    store.append_audit(committed)
    with pytest.raises(RuntimeError), store.unit_of_work() as unit:
        unit.append_audit(AuditEvent("verify", "a1", "REJECT", NOW))
        raise RuntimeError("rolled back")

    assert heard == [committed]
