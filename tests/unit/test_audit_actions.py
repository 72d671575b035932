"""Audit actions come from one enum, and its stored names never change.

The helpers that take an action (VerificationService.verify/judge, ShiftService.audit_event,
EnrollmentService._event) are typed AuditAction, so mypy refuses a literal passed to them; the
scan below covers what typing cannot: AuditEvent's `action: str` and `action=` keywords."""

from __future__ import annotations

import ast
from pathlib import Path

from server.audit_actions import AuditAction

ROOT = Path(__file__).resolve().parents[2]

# The names already stored in audit logs and hashed into their chains: renaming one would make
# old records unfindable by action (and exports inconsistent), so they are pinned here.
STORED_NAMES = {
    "agent.create",
    "agent.delete",
    "enrollment.add",
    "enrollment.reject_utterance",
    "enrollment.finalize",
    "verify",
    "shift.login",
    "shift.checkpoint",
    "shift.start",
    "shift.relogin",
    "shift.lock",
    "shift.admin_unlock",
    "shift.end",
    "shift.voice_change",
    "shift.second_voice",
    "assurance.revoke",
    "throttle.disable",
    "throttle.re_enable",
    "voiceprint.expire",
    "key.reencrypt",
    "storage.recover",
    "configuration",
    "access.denied",
    "enrollment.passive",
    "enrollment.hold",
    "voiceprint.approve",
    "voiceprint.reject",
    "watchlist.add",
    "watchlist.delete",
    "watchlist.expire",
    "watchlist.match",
}


def test_released_action_names_stay_as_stored() -> None:
    assert {action.value for action in AuditAction} >= STORED_NAMES


def _literal_action_lines(source: str) -> list[int]:
    """Lines where an audit action is written as a string literal: the action argument of an
    AuditEvent, or an `action=` keyword (argparse's excepted)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        callee = (
            node.func.attr
            if isinstance(node.func, ast.Attribute)
            else node.func.id
            if isinstance(node.func, ast.Name)
            else None
        )
        if callee == "add_argument":
            continue
        actions = [k.value for k in node.keywords if k.arg == "action"]
        if callee == "AuditEvent" and node.args:
            actions.append(node.args[0])
        if any(_is_text(a) for a in actions):
            lines.append(node.lineno)
    return lines


def _is_text(node: ast.expr) -> bool:
    return isinstance(node, ast.JoinedStr) or (
        isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


def test_no_audit_action_is_a_string_literal() -> None:
    sources = [
        p for package in ("server", "enrollment", "models") for p in (ROOT / package).rglob("*.py")
    ]
    assert len(sources) > 40
    hits = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in sources
        for line in _literal_action_lines(path.read_text())
    ]
    assert hits == []


def test_the_scan_finds_literal_actions() -> None:
    source = (
        'AuditEvent("verify", "a1", "ok", now)\n'
        'service.judge(voiceprint, sample, action="shift.checkpoint")\n'
        'parser.add_argument("--all", action="store_true")\n'
        'AuditEvent(AuditAction.VERIFY, "a1", "ok", now)\n'
        'AuditEvent(action=f"shift.{kind}", agent_id="a1", outcome="ok", at=now)\n'
    )
    assert _literal_action_lines(source) == [1, 2, 5]
