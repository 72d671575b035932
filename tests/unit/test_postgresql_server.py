"""The service on the shared PostgreSQL store (VOXAUTH_DB=postgresql://...): two servers on one
database, as two replicas, see each other's agents and share one audit chain. (The fake model:
the multi-replica end-to-end tests, with the real one, are in tests/e2e.)"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from voxauth.v1 import voxauth_pb2 as pb

from server.security.crypto import VoiceprintCipher
from server.storage.databases import open_store
from tests.fakes import FakeEmbedder, fake_scoring
from tests.postgres import PostgresServer
from tests.support import KEY, RunningServer, make_config


def test_two_servers_on_one_postgresql_database_share_agents_and_one_audit_chain(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    database = postgres_server.new_database()
    config = replace(
        make_config(tmp_path),
        database_path=database,
        scoring=fake_scoring(tmp_path / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    first = RunningServer(config, FakeEmbedder, KEY)
    try:
        second = RunningServer(config, FakeEmbedder, KEY)
        try:
            first.enrollment.CreateAgent(
                pb.CreateAgentRequest(agent_id="a1", display_name="A", consent_reference="HR-1")
            )
            status = second.enrollment.GetEnrollmentStatus(
                pb.GetEnrollmentStatusRequest(agent_id="a1")
            )
            assert status.agent.display_name == "A"
            assert not status.HasField("voiceprint")
            with pytest.raises(grpc.RpcError) as exists:
                second.enrollment.CreateAgent(
                    pb.CreateAgentRequest(agent_id="a1", display_name="A", consent_reference="X")
                )
            assert exists.value.code() is grpc.StatusCode.ALREADY_EXISTS
        finally:
            second.stop()
    finally:
        first.stop()
    store = open_store(database, VoiceprintCipher(KEY))
    try:
        records = store.audit_records(0, 1000)
        assert [r.seq for r in records] == list(range(1, len(records) + 1))
        assert "agent.create" in [r.entry.action for r in records]
    finally:
        store.close()
