"""What the PostgreSQL backend adds to the storage contract: several stores (as several
replicas would open them) on one database keep the invariants one process keeps: throttling
admits exactly the free attempts, the audit chain keeps one total order, a writer killed in
the middle of a transaction leaves nothing half-written and holds no lock; rows altered
behind the store's back are found; concurrent starts migrate once."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from server.config import ThrottlePolicy
from server.errors import AgentNotFoundError, StorageError, ThrottledError
from server.records import AuditEvent
from server.security.audit import AuditKey
from server.security.crypto import DataKey, VoiceprintCipher
from server.storage.sealing import KeyRing
from server.storage.secure_store import SecureStore
from server.tools import audit_cli, reencrypt_cli
from server.verification.throttling import VerificationThrottle
from tests.contract.conftest import KEY, PostgresStorage
from tests.contract.samples import MODEL, NOW, agent, utterance, voiceprint
from tests.postgres import PostgresServer

REPLICAS = 3


@pytest.fixture
def database(postgres_server: PostgresServer) -> PostgresStorage:
    return PostgresStorage(postgres_server.new_database())


@pytest.fixture(autouse=True)
def no_key_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands these tests run read the keys from VOXAUTH_KEY alone."""
    for name in ("VOXAUTH_KEY_FILE", "VOXAUTH_PREVIOUS_KEYS", "VOXAUTH_PREVIOUS_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def replicas(database: PostgresStorage) -> Iterator[list[SecureStore]]:
    """Stores on the same database, each with its own connection pool."""
    stores = [database.open() for _ in range(REPLICAS)]
    yield stores
    for store in stores:
        store.close()


def test_throttling_admits_exactly_the_free_attempts_across_replicas(
    replicas: list[SecureStore],
) -> None:
    policy = ThrottlePolicy()
    replicas[0].create_agent(agent("target"))
    throttles = [VerificationThrottle(store, policy) for store in replicas[:2]]
    attempts = 20
    start = threading.Barrier(attempts)

    def attempt(n: int) -> bool:
        start.wait()
        try:
            throttles[n % 2].check("target", NOW)
        except ThrottledError:
            return False
        return True

    with ThreadPoolExecutor(attempts) as pool:
        admitted = sum(pool.map(attempt, range(attempts)))

    assert admitted == policy.free_failures == 5
    state = replicas[1].update_throttle_state("target", lambda state: state)
    assert state.consecutive_failures == 5


def test_the_audit_chain_keeps_one_order_across_replicas(
    replicas: list[SecureStore], database: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    replicas[0].create_agent(agent("a1"))
    writers, per_writer = 12, 10

    def write(n: int) -> None:
        store = replicas[n % REPLICAS]
        for k in range(per_writer):
            store.append_audit(AuditEvent("verify", "a1", "ACCEPT", NOW, {"w": n, "k": k}))

    with ThreadPoolExecutor(writers + 1) as pool:
        written = pool.map(write, range(writers))
        # An operator's check while the replicas write: the head it reads first is intact.
        checked = pool.submit(audit_cli.main, ["verify", "--db", database.conninfo])
        list(written)
        assert checked.result() == audit_cli.EXIT_INTACT

    events = replicas[2].audit_events("a1")
    assert len(events) == writers * per_writer
    # Each writer's records in its own order, all in one chain.
    for n in range(writers):
        assert [e.details["k"] for e in events if e.details["w"] == n] == list(range(per_writer))
    head = replicas[1].audit_head()
    assert head is not None
    assert head.seq == len(replicas[0].audit_records(0, 10_000))

    assert audit_cli.main(["verify", "--db", database.conninfo]) == audit_cli.EXIT_INTACT
    # And a record altered in the database breaks it there.
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        conn.execute("UPDATE audit_log SET outcome = 'REJECT' WHERE seq = 7")
    assert audit_cli.main(["verify", "--db", database.conninfo]) == audit_cli.EXIT_BROKEN


def test_a_sealed_row_altered_by_sql_is_found(
    replicas: list[SecureStore], database: PostgresStorage
) -> None:
    store = replicas[0]
    store.create_agent(agent("a1"))
    store.replace_voiceprint(voiceprint("a1", "v"), [])
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        # One flipped byte inside the sealed embedding.
        conn.execute(
            "UPDATE voiceprints SET embedding = overlay(embedding placing "
            "decode(lpad(to_hex(get_byte(embedding, 40) # 1), 2, '0'), 'hex') from 41 for 1)"
        )
    with pytest.raises(StorageError, match="failed authentication"):
        replicas[1].get_voiceprint("a1")
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        conn.execute("UPDATE agents SET sealed_identity = sealed_identity || '\\x00'::bytea")
    with pytest.raises(StorageError):
        replicas[2].get_agent("a1")


_DIE_MID_WRITE = """
import os, sys
from tests.contract.conftest import PostgresStorage
from tests.contract.samples import agent, utterance
store = PostgresStorage(sys.argv[1]).open()
with store.unit_of_work("write, then die") as unit:
    unit.create_agent(agent("half"))
    unit.add_utterance(utterance("half", 1), max_pending=5)
    print("written", flush=True)
    sys.stdin.readline()  # killed here, the transaction open and the writer lock held
"""


def test_a_writer_killed_mid_transaction_leaves_nothing_and_holds_no_lock(
    database: PostgresStorage,
) -> None:
    store = database.open()
    try:
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "proto")])}
        with subprocess.Popen(
            [sys.executable, "-c", _DIE_MID_WRITE, database.conninfo],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        ) as dying:
            try:
                assert dying.stdout is not None
                assert dying.stdout.readline().strip() == "written"
            finally:
                dying.send_signal(signal.SIGKILL)
                dying.wait(timeout=30)
        # The server sees the socket close, rolls back and drops the lock: this write, which
        # needs the writer lock, goes through.
        store.create_agent(agent("after"))
        with pytest.raises(AgentNotFoundError):
            store.get_agent("half")
        assert store.get_agent("after").agent_id == "after"
        assert store.audit_events() == []
    finally:
        store.close()


def test_a_connection_killed_inside_a_unit_changes_nothing_and_the_pool_recovers(
    database: PostgresStorage, postgres_server: PostgresServer
) -> None:
    store = database.open()
    try:
        with pytest.raises(StorageError), store.unit_of_work("write into a killed session") as unit:
            unit.create_agent(agent("half"))
            with postgres_server.admin() as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() OR state = 'idle in transaction'"
                )
            unit.add_utterance(utterance("half", 1), max_pending=5)
        with pytest.raises(AgentNotFoundError):
            store.get_agent("half")
        store.create_agent(agent("after"))
        assert [a.agent_id for a in [store.get_agent("after")]] == ["after"]
    finally:
        store.close()


def test_replicas_starting_together_migrate_once(database: PostgresStorage) -> None:
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: database.open(), range(4)))
    try:
        stores[0].create_agent(agent("a1"))
        assert stores[3].get_agent("a1").agent_id == "a1"
        head = stores[2].audit_head()
        assert head is not None and head.seq == 0
    finally:
        for store in stores:
            store.close()


def test_a_database_from_a_newer_voxauth_is_refused(database: PostgresStorage) -> None:
    database.open().close()
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        conn.execute("UPDATE voxauth_schema_version SET version_num = '9999'")
    with pytest.raises(StorageError, match="upgrade voxauth"):
        database.open()


def test_an_unreachable_database_fails_the_open(tmp_path: Path) -> None:
    missing = PostgresStorage(f"postgresql:///voxauth?host={tmp_path}&connect_timeout=2")
    with pytest.raises(StorageError, match="cannot migrate"):
        missing.open()


def test_erasure_deletes_the_key_row_every_replica_reads(
    replicas: list[SecureStore], database: PostgresStorage
) -> None:
    for agent_id in ("kept", "erased"):
        replicas[0].create_agent(agent(agent_id))
        replicas[0].replace_voiceprint(voiceprint(agent_id, agent_id), [])
    assert replicas[1].get_voiceprint("erased") is not None
    replicas[2].delete_agent("erased")
    with pytest.raises(AgentNotFoundError):
        replicas[1].get_voiceprint("erased")
    with psycopg.connect(database.conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM agent_keys").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM voiceprints").fetchone() == (1,)
        # The store vacuumed after the erasure: the tables' pages hold no tuple, dead or alive,
        # but the kept agent's (a dead one would until autovacuum came by).
        conn.execute("CREATE EXTENSION IF NOT EXISTS pageinspect")
        for table in ("agent_keys", "agents", "voiceprints"):
            row = conn.execute(
                "SELECT count(*) FROM generate_series(0, "
                "pg_relation_size(%s::regclass) / current_setting('block_size')::int - 1) AS b, "
                "heap_page_items(get_raw_page(%s, b::int)) WHERE t_data IS NOT NULL",
                (table, table),
            ).fetchone()
            assert row == (1,), table


def test_voiceprints_written_on_one_replica_read_on_another(
    replicas: list[SecureStore],
) -> None:
    replicas[0].create_agent(agent("a1"))
    replicas[1].replace_voiceprint(voiceprint("a1", "v"), [])
    read = replicas[2].voiceprints(MODEL)
    assert [v.agent_id for v in read] == ["a1"]
    later = replace(voiceprint("a1", "w"), created_at=NOW + timedelta(days=1))
    assert replicas[0].replace_voiceprint(later, []) is True


def test_the_store_carries_on_after_the_database_restarts(
    database: PostgresStorage, postgres_server: PostgresServer
) -> None:
    store = database.open()
    try:
        store.create_agent(agent("before"))
        postgres_server.restart()
        # The pool finds its connections dead and opens new ones: no call fails for them.
        store.create_agent(agent("after"))
        assert {store.get_agent(a).agent_id for a in ("before", "after")} == {"before", "after"}
    finally:
        store.close()


def test_audit_verify_refuses_a_database_without_a_store(
    database: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    # Opening would create an empty store, whose chain is intact.
    assert audit_cli.main(["verify", "--db", database.conninfo]) == audit_cli.EXIT_USAGE
    with psycopg.connect(database.conninfo) as conn:
        assert conn.execute("SELECT to_regclass('audit_log')").fetchone() == (None,)


def test_retiring_the_service_key_completes_an_erasure_in_old_copies(
    database: PostgresStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_key, new_key = KEY, bytes(range(100, 132))
    store = database.open()
    for agent_id in ("kept", "erased"):
        store.create_agent(agent(agent_id))
        store.replace_voiceprint(voiceprint(agent_id, agent_id), [])
    store.close()
    # What a backup (or the WAL) holds of the keys from before the erasure.
    with psycopg.connect(database.conninfo) as conn:
        backup: dict[str, bytes] = dict(
            conn.execute("SELECT agent_handle, wrapped_key FROM agent_keys").fetchall()
        )
    store = database.open()
    store.delete_agent("erased")
    store.close()
    with psycopg.connect(database.conninfo) as conn:
        left = {handle for (handle,) in conn.execute("SELECT agent_handle FROM agent_keys")}
    [erased_handle] = set(backup) - left
    old_ring = KeyRing(VoiceprintCipher(old_key), DataKey.generate())
    old_ring.agent_key(erased_handle, backup[erased_handle])  # opens, with the old key

    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(new_key).decode())
    monkeypatch.setenv("VOXAUTH_PREVIOUS_KEYS", base64.b64encode(old_key).decode())
    assert reencrypt_cli.main(["--db", database.conninfo]) == 0

    # The old key retired: the store opens without it, and the copy opens no more.
    rotated = database.open(VoiceprintCipher(new_key), AuditKey(new_key))
    try:
        assert rotated.get_voiceprint("kept") is not None
    finally:
        rotated.close()
    new_ring = KeyRing(VoiceprintCipher(new_key), DataKey.generate())
    with pytest.raises(StorageError):
        new_ring.agent_key(erased_handle, backup[erased_handle])
