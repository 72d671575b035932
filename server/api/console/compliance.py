"""The compliance report (GDPR art. 5(2): the controller proves compliance): what the audit
log says happened in a period, the policy in force, the accuracy the last `voxauth eval`
measured, and whether the audit chain is intact. `voxauth report` writes it as one
self-contained HTML file; the console's compliance page shows the same content.

Everything is read from the audit chain, through the store, after checking the chain with the
service key: a report over a log that does not verify says so at its top.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2

from server.audit_actions import AuditAction
from server.config import ServerConfig
from server.errors import AgentNotFoundError
from server.security.audit import AuditKey, ChainReport, verify_log
from server.storage.interface import AuditEvent, VoiceprintStore

TEMPLATES = Path(__file__).parent / "templates"
# A DET plot is ~50 KB; a larger "plot" is not one eval wrote, and would bloat every page.
_MAX_PLOT_BYTES = 4 * 1024 * 1024
_DECISIONS = (AuditAction.VERIFY, AuditAction.SHIFT_LOGIN, AuditAction.SHIFT_CHECKPOINT)
# The policy sections the report shows, from the effective configuration.
_POLICY_SECTIONS = ("scoring", "presentation", "throttle", "retention", "shifts")


def environment() -> jinja2.Environment:
    """Autoescaping everywhere: agent ids, reasons and methods in the log are untrusted."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end


# --- the last evaluation ------------------------------------------------------------------


@dataclass(frozen=True)
class Evaluation:
    """What `voxauth eval` wrote last (server/tools/evaluation.py): figures per condition and
    its DET plot, inlined."""

    written_at: str
    model: str
    target_fmr: float
    speakers: int
    conditions: Sequence[Mapping[str, Any]]
    det_png_base64: str | None
    problem: str | None = None


def write_evaluation(
    path: Path,
    *,
    model: str,
    target_fmr: float,
    speakers: int,
    conditions: Sequence[Mapping[str, Any]],
    det_plot: Path,
    now: datetime | None = None,
) -> None:
    """Written beside and moved into place: a report never reads half a file."""
    document = {
        "written_at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "model": model,
        "target_fmr": target_fmr,
        "speakers": speakers,
        "conditions": list(conditions),
        "det_plot": str(det_plot.resolve()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2, sort_keys=True), encoding="utf-8")
    partial.replace(path)


def load_evaluation(path: Path) -> Evaluation | None:
    """None when no evaluation was run; one with `problem` set when its file is unreadable."""
    if not path.exists():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        conditions = document["conditions"]
        if not isinstance(conditions, list) or not all(isinstance(c, dict) for c in conditions):
            raise ValueError("conditions is not a list of objects")
        evaluation = Evaluation(
            written_at=str(document["written_at"]),
            model=str(document["model"]),
            target_fmr=float(document["target_fmr"]),
            speakers=int(document["speakers"]),
            conditions=conditions,
            det_png_base64=None,
        )
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        return Evaluation("", "", math.nan, 0, (), None, f"{path} does not read: {error}")
    plot = Path(str(document.get("det_plot", "")))
    try:
        data = plot.read_bytes() if plot.is_file() else b""
    except OSError:
        data = b""
    if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) > _MAX_PLOT_BYTES:
        return _with_problem(evaluation, f"the DET plot {plot} is missing or not a PNG")
    return Evaluation(**{**evaluation.__dict__, "det_png_base64": base64.b64encode(data).decode()})


def _with_problem(evaluation: Evaluation, problem: str) -> Evaluation:
    return Evaluation(**{**evaluation.__dict__, "problem": problem})


# --- the report ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    at: datetime
    agent: str
    note: str = ""


@dataclass(frozen=True)
class ComplianceReport:
    period: Period
    generated_at: datetime
    chain: ChainReport
    consents: list[Entry]
    erasures: list[Entry]
    expired: list[Entry]
    denials: dict[str, int]
    decisions: dict[str, dict[str, int]]
    """channel -> outcome (ACCEPT, REJECT, INCONCLUSIVE, ...) -> count."""
    pad_refusals: dict[str, dict[str, int]]
    """channel -> PAD decision (ATTACK, REPLAY) -> count."""
    policy: dict[str, dict[str, Any]]
    evaluation: Evaluation | None
    records_in_period: int = 0
    outcomes: tuple[str, ...] = field(default=())


def build_report(
    store: VoiceprintStore,
    keys: Iterable[AuditKey],
    config: ServerConfig,
    period: Period,
    now: datetime,
    evaluation: Evaluation | None,
) -> ComplianceReport:
    """Blocking (reads the whole audit log): call from a worker thread."""
    chain = verify_log(store, keys)
    events = [event for event in store.audit_events() if event.at in period]
    consents, erasures, expired = [], [], []
    denials: Counter[str] = Counter()
    decisions: defaultdict[str, Counter[str]] = defaultdict(Counter)
    pad: defaultdict[str, Counter[str]] = defaultdict(Counter)
    for event in events:
        action = event.action
        if action == AuditAction.AGENT_CREATE:
            consents.append(
                Entry(event.at, event.agent_id or "(erased since)", _consent(store, event))
            )
        elif action == AuditAction.AGENT_DELETE:
            # DeleteAgent erases within the call: the request and its completion are one time.
            erasures.append(Entry(event.at, event.agent_id, "requested and completed"))
        elif action == AuditAction.VOICEPRINT_EXPIRE:
            days = event.details.get("unused_for_more_than_days")
            expired.append(
                Entry(event.at, event.agent_id or "(erased since)", f"unused > {days} days")
            )
        elif action == AuditAction.ACCESS_DENIED:
            denials[str(event.details.get("method", "?"))] += 1
        elif action in _DECISIONS:
            decisions[_channel(event)][event.outcome] += 1
        elif action == AuditAction.PRESENTATION_ATTACK:
            pad[_channel(event)][event.outcome] += 1
    document = json.loads(config.as_json())
    return ComplianceReport(
        period=period,
        generated_at=now,
        chain=chain,
        consents=consents,
        erasures=erasures,
        expired=expired,
        denials=dict(sorted(denials.items())),
        decisions={c: dict(sorted(v.items())) for c, v in sorted(decisions.items())},
        pad_refusals={c: dict(sorted(v.items())) for c, v in sorted(pad.items())},
        policy={section: document[section] for section in _POLICY_SECTIONS},
        evaluation=evaluation,
        records_in_period=len(events),
        outcomes=tuple(sorted({o for v in decisions.values() for o in v})),
    )


def _consent(store: VoiceprintStore, event: AuditEvent) -> str:
    if not event.agent_id:
        return "(agent erased since; the consent went with it)"
    try:
        return f"consent {store.get_agent(event.agent_id).consent_reference}"
    except AgentNotFoundError:
        return "(agent erased since; the consent went with it)"


def _channel(event: AuditEvent) -> str:
    # A checkpoint with too little speech never reached the channel analysis.
    return str(event.details.get("channel", "not analysed"))


def render_html(report: ComplianceReport) -> str:
    """The whole report as one HTML document: inline CSS, the DET plot as a data: URI, no
    external asset, so it can be mailed, archived or printed as it is."""
    return environment().get_template("report.html").render(report=report, standalone=True)
