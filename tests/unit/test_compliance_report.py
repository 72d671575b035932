"""The compliance report over a real SQLite store: what the audit log holds in the period is
counted where it belongs, hostile text is escaped, the page is self-contained, and a tampered
chain is reported as broken at its top."""

from __future__ import annotations

import base64
import re
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from server.api.console.compliance import (
    Period,
    build_report,
    load_evaluation,
    render_html,
    write_evaluation,
)
from server.audit_actions import AuditAction
from server.config import ServerConfig
from server.records import AgentRecord, AuditEvent
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.storage.secure_store import SecureStore
from server.storage.sqlite import open_store
from server.tools.report_cli import main as report_main

KEY = bytes(range(32))
DAY = datetime(2026, 11, 3, tzinfo=UTC)
PERIOD = Period(DAY, DAY + timedelta(days=1))
HOSTILE = '<script>alert("x")</script>'
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "voxauth.db"


@pytest.fixture
def store(db: Path) -> Iterator[SecureStore]:
    opened = open_store(db, VoiceprintCipher(KEY), audit_key=AuditKey(KEY))
    yield opened
    opened.close()


def event(
    action: AuditAction, agent: str, outcome: str, hour: float, **details: object
) -> AuditEvent:
    return AuditEvent(action, agent, outcome, DAY + timedelta(hours=hour), details)


def fill(store: SecureStore) -> None:
    for agent_id, consent in (("ann", HOSTILE), ("bob", "HR-2026-17")):
        store.create_agent(AgentRecord(agent_id, agent_id.title(), consent, DAY))
        store.append_audit(event(AuditAction.AGENT_CREATE, agent_id, "ok", 1))
    # Before the period: not counted.
    store.append_audit(event(AuditAction.VERIFY, "ann", "ACCEPT", -2, channel="wideband"))
    for outcome, channel in (
        ("ACCEPT", "wideband"),
        ("ACCEPT", "wideband"),
        ("REJECT", "telephone"),
    ):
        store.append_audit(event(AuditAction.VERIFY, "ann", outcome, 2, channel=channel))
    store.append_audit(event(AuditAction.SHIFT_LOGIN, "bob", "ACCEPT", 3, channel="telephone"))
    store.append_audit(event(AuditAction.SHIFT_CHECKPOINT, "bob", "INSUFFICIENT_SPEECH", 4))
    store.append_audit(
        event(AuditAction.PRESENTATION_ATTACK, "bob", "ATTACK", 4, channel="telephone")
    )
    for method in ("/voxauth.v1.AdminService/UnlockShift", "/voxauth.v1.AdminService/UnlockShift"):
        store.append_audit(
            event(AuditAction.ACCESS_DENIED, "", "PERMISSION_DENIED", 5, method=method)
        )
    store.append_audit(
        event(AuditAction.VOICEPRINT_EXPIRE, "bob", "ok", 6, unused_for_more_than_days=1095)
    )
    store.delete_agent("ann")
    store.append_audit(event(AuditAction.AGENT_DELETE, "ann", "ok", 7))
    # After the period: not counted.
    store.append_audit(event(AuditAction.VERIFY, "bob", "REJECT", 30, channel="wideband"))


def test_the_report_counts_the_period_and_escapes_what_the_log_holds(
    store: SecureStore, tmp_path: Path
) -> None:
    fill(store)
    plot = tmp_path / "det.png"
    plot.write_bytes(PNG)
    results = tmp_path / "eval.json"
    figures = {
        "name": "wideband, full test",
        "target_trials": 4,
        "impostor_trials": 12,
        "eer_normalized": 0.0,
        "fmr_at_policy": "0.00% (0/12; 0.00%-24.25%)",
        "fnmr_at_policy": "0.00% (0/4; 0.00%-48.99%)",
    }
    write_evaluation(
        results, model="ecapa-x", target_fmr=1e-4, speakers=5, conditions=[figures], det_plot=plot
    )
    report = build_report(
        store, [AuditKey(KEY)], ServerConfig(), PERIOD, DAY, load_evaluation(results)
    )
    assert report.chain.intact
    assert [(e.agent, e.note) for e in report.consents] == [
        ("(erased since)", "(agent erased since; the consent went with it)"),
        ("bob", "consent HR-2026-17"),
    ]
    assert [(e.agent, e.at.hour) for e in report.erasures] == [("ann", 7)]
    assert [e.agent for e in report.expired] == ["bob"]
    assert report.denials == {"/voxauth.v1.AdminService/UnlockShift": 2}
    assert report.decisions == {
        "not analysed": {"INSUFFICIENT_SPEECH": 1},
        "telephone": {"ACCEPT": 1, "REJECT": 1},
        "wideband": {"ACCEPT": 2},
    }
    assert report.pad_refusals == {"telephone": {"ATTACK": 1}}
    assert report.policy["scoring"]["target_fmr"] == ServerConfig().scoring.target_fmr

    html = render_html(report)
    assert "Intact:" in html and "Broken" not in html
    assert "HR-2026-17" in html
    # Self-contained: no script, no external reference; the plot inlined.
    assert "<script" not in html
    assert not re.search(r"""(src|href)=["'](?!data:)""", html)
    assert f"data:image/png;base64,{base64.b64encode(PNG).decode()}" in html
    assert "wideband, full test" in html and "ecapa-x" in html


def test_a_consent_reference_with_markup_is_shown_as_text(store: SecureStore) -> None:
    store.create_agent(AgentRecord("eve", "Eve", HOSTILE, DAY))
    store.append_audit(event(AuditAction.AGENT_CREATE, "eve", "ok", 1))
    html = render_html(build_report(store, [AuditKey(KEY)], ServerConfig(), PERIOD, DAY, None))
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    assert "No evaluation has been run" in html


def test_a_tampered_chain_is_reported_broken_and_the_command_exits_1(
    store: SecureStore, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE audit_log SET outcome = 'ACCEPT' WHERE seq = 6")
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    out = tmp_path / "report.html"
    arguments = ["--from", "2026-11-03", "--to", "2026-11-03", "--db", str(db), "--out", str(out)]
    assert report_main([*arguments, "--eval", str(tmp_path / "none.json")]) == 1
    html = out.read_text()
    assert "Broken" in html and "at record 6" in html
    assert out.stat().st_mode & 0o077 == 0
    # --to before --from, and a database that is not there, are usage errors.
    assert report_main(["--from", "2026-11-04", "--to", "2026-11-02", "--db", str(db)]) == 2
    assert report_main([*arguments[:4], "--db", str(tmp_path / "missing.db")]) == 2


def test_an_unreadable_evaluation_is_reported_not_fatal(tmp_path: Path) -> None:
    results = tmp_path / "eval.json"
    results.write_text("{not json")
    evaluation = load_evaluation(results)
    assert evaluation is not None and evaluation.problem and "does not read" in evaluation.problem
    write_evaluation(
        results, model="m", target_fmr=1e-4, speakers=2, conditions=[], det_plot=tmp_path / "x.png"
    )
    evaluation = load_evaluation(results)
    assert evaluation is not None and evaluation.det_png_base64 is None
    assert evaluation.problem is not None and "not a PNG" in evaluation.problem


def test_the_report_prints_to_pdf_with_chromium(
    store: SecureStore, db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store)
    monkeypatch.setenv("VOXAUTH_KEY", base64.b64encode(KEY).decode())
    out, pdf = tmp_path / "report.html", tmp_path / "report.pdf"
    arguments = ["--from", "2026-11-03", "--to", "2026-11-03", "--db", str(db), "--out", str(out)]
    arguments += ["--eval", str(tmp_path / "none.json")]
    assert report_main([*arguments, "--pdf", str(pdf)]) == 0
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_mode & 0o077 == 0
    missing = ["--pdf", str(tmp_path / "x.pdf"), "--browser", str(tmp_path / "no-chromium")]
    assert report_main([*arguments, *missing]) == 2
