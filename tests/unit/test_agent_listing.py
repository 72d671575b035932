"""HR tooling: ListAgents (states, voiceprint age and expiry, paging with sealed tokens) and
the sources of bulk enrollment (CSV and folders, with hostile paths and cells)."""

from __future__ import annotations

import base64
import io
import socket
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import numpy as np
import pytest
from voxauth.v1 import voxauth_pb2 as pb

from enrollment.listing import AgentDirectory, AgentFilter, EnrollmentState
from models.embedder import Embedding
from server.api.page_tokens import TOKEN_LIFETIME, PageTokens
from server.config import EnrollmentPolicy, RetentionPolicy
from server.errors import InvalidRequestError
from server.records import AgentRecord, UtteranceRecord, Voiceprint
from server.security.crypto import VoiceprintCipher, derive_subkey
from server.storage.sqlite import open_store
from server.tools.agents_cli import EXIT_INCOMPLETE
from server.tools.bulk_enroll import (
    Outcome,
    PlanError,
    Result,
    plan_from_csv,
    plan_from_folder,
    spreadsheet_safe,
    write_report,
)
from server.tools.cli import main
from tests.audio_files import encoded_file
from tests.fakes import FakeEmbedder, fake_scoring
from tests.support import KEY, RunningServer, make_config

NOW = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)


# --- page tokens ------------------------------------------------------------------------------


def test_a_page_token_opens_only_for_its_caller_scope_and_lifetime() -> None:
    tokens = PageTokens()
    token = tokens.issue("agent-7", caller="hr-desk", scope="all", now=NOW)
    assert "agent-7" not in base64.urlsafe_b64decode(token + "==").decode("latin-1")
    assert tokens.open(token, caller="hr-desk", scope="all", now=NOW) == "agent-7"
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    refused = [
        (token, "softphone-1", "all", NOW),  # another caller
        (token, "hr-desk", "enrolled only", NOW),  # other filters
        (token, "hr-desk", "all", NOW + TOKEN_LIFETIME + timedelta(seconds=1)),  # expired
        (token, "hr-desk", "all", NOW - timedelta(seconds=1)),  # from the future
        (flipped, "hr-desk", "all", NOW),  # altered
        ("", "hr-desk", "all", NOW),
        ("not base64 at all!", "hr-desk", "all", NOW),
        ("A" * 5000, "hr-desk", "all", NOW),
        (base64.urlsafe_b64encode(b'{"after": "zzz"}').decode(), "hr-desk", "all", NOW),
    ]
    for candidate, caller, scope, at in refused:
        with pytest.raises(InvalidRequestError) as caught:
            tokens.open(candidate, caller=caller, scope=scope, now=at)
        assert caught.value.field == "page_token"
    # A key of another process's own (no service key given) opens none of them.
    with pytest.raises(InvalidRequestError):
        PageTokens().open(token, caller="hr-desk", scope="all", now=NOW)


def test_replicas_with_one_service_key_continue_each_others_listings() -> None:
    # Behind a load balancer the next page's call may reach another replica.
    one = PageTokens(derive_subkey(KEY, "voxauth listing page tokens v1"))
    two = PageTokens(derive_subkey(KEY, "voxauth listing page tokens v1"))
    token = one.issue("agent-7", caller="hr-desk", scope="all", now=NOW)
    assert two.open(token, caller="hr-desk", scope="all", now=NOW) == "agent-7"
    other_service = PageTokens(derive_subkey(bytes(32), "voxauth listing page tokens v1"))
    other_purpose = PageTokens(derive_subkey(KEY, "something else"))
    for tokens in (other_service, other_purpose):
        with pytest.raises(InvalidRequestError):
            tokens.open(token, caller="hr-desk", scope="all", now=NOW)


# --- the listing ------------------------------------------------------------------------------


@pytest.fixture
def directory(tmp_path: Path) -> AgentDirectory:
    store = open_store(tmp_path / "voxauth.db", VoiceprintCipher(KEY))
    embedding: Embedding = np.full(4, 0.5, dtype=np.float32)
    for i in range(7):
        store.create_agent(AgentRecord(f"agent-{i}", f"Agent {i}", "HR-1", NOW))
    # agent-1 and agent-2 have pending speech (2 s, 6 s); agent-3..5 are enrolled at
    # different ages; agent-0 and agent-6 have nothing yet.
    for agent_id, seconds in (("agent-1", 2.0), ("agent-2", 6.0)):
        store.add_utterance(
            UtteranceRecord(
                f"u-{agent_id}", agent_id, "fake", embedding, seconds, seconds, -20, 0, NOW
            ),
            max_pending=10,
        )
    for agent_id, age_days in (("agent-3", 10), ("agent-4", 400), ("agent-5", 1000)):
        made = NOW - timedelta(days=age_days)
        store.replace_voiceprint(Voiceprint(agent_id, "fake", embedding, made, 2, 20.0), [])
    ttl = RetentionPolicy(voiceprint_ttl_days=1095)
    return AgentDirectory(store, EnrollmentPolicy(required_net_speech_seconds=5.0), ttl)


def ids(directory: AgentDirectory, wanted: AgentFilter) -> list[str]:
    page = directory.page(wanted, after=None, size=100, now=NOW)
    return [listing.overview.agent.agent_id for listing in page.agents]


def test_states_age_and_expiry_filter_the_listing(directory: AgentDirectory) -> None:
    page = directory.page(AgentFilter(), after=None, size=100, now=NOW)
    states = {listing.overview.agent.agent_id: listing.state for listing in page.agents}
    assert states == {
        "agent-0": EnrollmentState.NOT_STARTED,
        "agent-1": EnrollmentState.COLLECTING,
        "agent-2": EnrollmentState.READY_TO_FINALIZE,
        "agent-3": EnrollmentState.ENROLLED,
        "agent-4": EnrollmentState.ENROLLED,
        "agent-5": EnrollmentState.ENROLLED,
        "agent-6": EnrollmentState.NOT_STARTED,
    }
    five = next(listing for listing in page.agents if listing.overview.agent.agent_id == "agent-5")
    assert five.voiceprint_expires_at == NOW - timedelta(days=1000) + timedelta(days=1095)
    both = AgentFilter(frozenset({EnrollmentState.COLLECTING, EnrollmentState.NOT_STARTED}))
    assert ids(directory, both) == ["agent-0", "agent-1", "agent-6"]
    assert ids(directory, AgentFilter.of((), 365, 0)) == ["agent-4", "agent-5"]
    assert ids(directory, AgentFilter.of((), 0, 100)) == ["agent-5"]
    assert ids(directory, AgentFilter.of((), 0, 0, "agent-2")) == ["agent-2"]
    for bad in ((-1, 0), (0, float("nan")), (0, 1e9)):
        with pytest.raises(InvalidRequestError):
            AgentFilter.of((), *bad)


def test_pages_cover_every_agent_once_as_agents_come_and_go(directory: AgentDirectory) -> None:
    seen: list[str] = []
    after = None
    for _ in range(10):
        page = directory.page(AgentFilter(), after=after, size=3, now=NOW)
        seen += [listing.overview.agent.agent_id for listing in page.agents]
        if page.last_agent_id is None:
            break
        after = page.last_agent_id
    assert seen == [f"agent-{i}" for i in range(7)]
    # Positions, not offsets: an agent erased before the next page shifts nothing.
    first = directory.page(AgentFilter(), after=None, size=3, now=NOW)
    directory._store.delete_agent("agent-1")
    second = directory.page(AgentFilter(), after=first.last_agent_id, size=3, now=NOW)
    assert [x.overview.agent.agent_id for x in second.agents] == ["agent-3", "agent-4", "agent-5"]
    for size in (0, 501):
        with pytest.raises(InvalidRequestError):
            directory.page(AgentFilter(), after=None, size=size, now=NOW)


def test_list_agents_pages_over_the_socket_and_refuses_forged_tokens(tmp_path: Path) -> None:
    config = replace(
        make_config(tmp_path),
        scoring=fake_scoring(tmp_path / "scoring", FakeEmbedder.model_id, FakeEmbedder.dimension),
    )
    server = RunningServer(config, FakeEmbedder, KEY)
    try:
        for i in range(5):
            server.enrollment.CreateAgent(
                pb.CreateAgentRequest(
                    agent_id=f"team-a.{i}", display_name=f"A {i}", consent_reference="HR-2"
                )
            )
        listed, token, calls = [], "", 0
        while True:
            page = server.enrollment.ListAgents(
                pb.ListAgentsRequest(page_size=2, page_token=token, agent_id_prefix="team-a.")
            )
            calls += 1
            listed += [(s.agent.agent_id, s.enrollment_state) for s in page.agents]
            token = page.next_page_token
            if not token:
                break
        assert calls == 3
        assert listed == [(f"team-a.{i}", pb.ENROLLMENT_STATE_NOT_STARTED) for i in range(5)]
        first = server.enrollment.ListAgents(pb.ListAgentsRequest(page_size=2))
        for request in (
            # The token of one listing used for another (wider) one.
            pb.ListAgentsRequest(page_token=first.next_page_token, agent_id_prefix="team-a."),
            pb.ListAgentsRequest(page_token=first.next_page_token[:-4] + "AAAA"),
            pb.ListAgentsRequest(states=[pb.ENROLLMENT_STATE_UNSPECIFIED]),
            pb.ListAgentsRequest(page_size=10_000),
            pb.ListAgentsRequest(voiceprint_older_than_days=-3),
            pb.ListAgentsRequest(agent_id_prefix="../etc"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                server.enrollment.ListAgents(request)
            assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.stop()


# --- bulk enrollment sources ----------------------------------------------------------------


def write_csv(folder: Path, text: str) -> Path:
    path = folder / "team.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_rows_become_jobs_and_bad_rows_failures(tmp_path: Path) -> None:
    (tmp_path / "audio").mkdir()
    for name in ("a1.wav", "a2.mp3", "b.flac"):
        (tmp_path / "audio" / name).write_bytes(b"x")
    outside = tmp_path.parent / "secret.wav"
    (tmp_path / "audio" / "link.wav").symlink_to(outside)
    csv_path = write_csv(
        tmp_path,
        "\ufeffAgent_ID,Display_Name,Consent_Reference,Files\n"
        'agent-a,"Doe, Jane",HR-1,audio/a1.wav; audio/a2.mp3\n'
        "agent-b,Bob,HR-2,audio/b.flac\n"
        "agent-b,Bob again,HR-2,audio/b.flac\n"
        "agent-c,Carol,HR-3,../../etc/passwd\n"
        "agent-d,Dan,HR-4,/etc/passwd\n"
        "agent-e,Eve,HR-5,audio/link.wav\n"
        '=HYPERLINK("http://x"),Mallory,HR-6,audio/b.flac\n'
        "agent-f,=1+1,HR-7,audio/b.flac\n"
        "agent-g,Gus,HR-8\n"
        "agent-h,Hal,HR-9,\n"
        ",,,\n",
    )
    plan = plan_from_csv(csv_path)
    jobs = {job.agent_id: job for job in plan.jobs}
    assert sorted(jobs) == ["agent-a", "agent-b"]
    audio = (tmp_path / "audio").resolve()
    assert jobs["agent-a"].files == [audio / "a1.wav", audio / "a2.mp3"]
    assert jobs["agent-a"].display_name == "Doe, Jane"
    assert jobs["agent-a"].consent_reference == "HR-1"
    problems = {p.agent_id: p.reason for p in plan.problems}
    assert "second row" in problems["agent-b"]
    for agent_id in ("agent-c", "agent-d", "agent-e"):
        assert "is not inside the CSV's folder" in problems[agent_id]
    assert "formula" in problems["row 8"] and "formula" in problems["agent-f"]
    assert "cells" in problems["row 10"]
    assert "no files" in problems["agent-h"]
    assert all(p.result is Result.FAILED for p in plan.problems)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"agent_id,files\nx,y\n", "missing consent_reference, display_name"),
        (b"agent_id,display_name,consent_reference,files\n\0\n", "NUL"),
        (b"agent_id,display_name,consent_reference,files\n\xff\xfe\n", "not UTF-8"),
        (b'agent_id,display_name,consent_reference,files\n"open,quote\n', "not a valid CSV"),
    ],
)
def test_an_unusable_csv_is_refused_whole(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "team.csv"
    path.write_bytes(content)
    with pytest.raises(PlanError, match=message):
        plan_from_csv(path)


def test_a_folder_gives_one_job_per_sub_folder_or_file_prefix(tmp_path: Path) -> None:
    (tmp_path / "agent-1").mkdir()
    (tmp_path / "agent-1" / "one.wav").write_bytes(b"x")
    (tmp_path / "agent-1" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "agent-2_monday.flac").write_bytes(b"x")
    (tmp_path / "agent-2_tuesday.mp3").write_bytes(b"x")
    (tmp_path / "stray.wav").write_bytes(b"x")
    (tmp_path / "agent-3").mkdir()
    (tmp_path / "agent-3" / "escape.wav").symlink_to(tmp_path.parent / "elsewhere.wav")
    (tmp_path / "agent-4").symlink_to(tmp_path.parent)
    plan = plan_from_folder(tmp_path, "HR-batch-7")
    jobs = {job.agent_id: job for job in plan.jobs}
    assert sorted(jobs) == ["agent-1", "agent-2"]
    assert [f.name for f in jobs["agent-1"].files] == ["one.wav"]
    assert [f.name for f in jobs["agent-2"].files] == ["agent-2_monday.flac", "agent-2_tuesday.mp3"]
    assert jobs["agent-2"].consent_reference == "HR-batch-7"
    problems = {p.agent_id: p.reason for p in plan.problems}
    assert "AGENT_anything.ext" in problems["stray.wav"]
    assert problems["agent-3"] == "no files"
    assert "links outside" in problems["agent-4"]


def test_reports_neutralise_formulas() -> None:
    assert spreadsheet_safe("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    assert spreadsheet_safe("agent-1") == "agent-1"
    out = io.StringIO()
    write_report([Outcome("@SUM(A1)", Result.FAILED, "-2+3")], out)
    assert out.getvalue().splitlines()[1] == "'@SUM(A1),failed,'-2+3"


def test_bulk_enrollment_stops_at_an_unreachable_server_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    team = tmp_path / "team"
    for agent_id in ("agent-1", "agent-2", "agent-3"):
        (team / agent_id).mkdir(parents=True)
        (team / agent_id / "a.wav").write_bytes(
            encoded_file(np.zeros(16_000, np.float32), 16_000, "WAV", "PCM_16")
        )
    (team / "stray.wav").write_bytes(b"x")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    bulk = ["agents", "enroll-bulk", "--server", f"127.0.0.1:{port}", "--insecure", str(team)]
    assert main([*bulk, "--consent", "HR-1"]) == EXIT_INCOMPLETE
    out = capsys.readouterr().out
    assert "enrolled 0, skipped 0, failed 4" in out
    assert "failed agent-1: UNAVAILABLE" in out
    assert "failed agent-3: not tried: the server is unreachable" in out
    assert "failed stray.wav: a file at the top" in out
