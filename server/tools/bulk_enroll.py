"""Bulk enrollment for HR: a team at once, from a folder or a CSV, with a progress line, a
summary at the end, and a re-run that skips the agents already enrolled.

Sources:
  - a folder with one sub-folder per agent (the sub-folder's name is the agent id), and/or
    files named AGENT_anything.ext at its top (the agent id is the part before the first
    "_": ids that contain "_" need a sub-folder or the CSV). New agents get their id as the
    display name and the consent reference given on the command line.
  - a CSV with a header row: agent_id, display_name, consent_reference, files (paths
    separated by ";", relative to the CSV's folder).

Each agent is done on its own: its files are checked before anything is sent (so a file the
server would refuse never leaves a new agent created without a voiceprint), and a failure
(a bad file, a refusal, too little speech) is reported and the next agent goes ahead. Paths
that leave the source folder (absolute, "..", or a link pointing out) are refused, and cells
that a spreadsheet would run as a formula are refused on input and neutralised in reports.
"""

from __future__ import annotations

import csv
import enum
import io
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import grpc

from server.tools.client import AudioFile, AudioFileError, EnrollmentClient

MAX_CSV_BYTES = 16 * 2**20
MAX_ROWS = 100_000
FILE_SEPARATOR = ";"
# What spreadsheets take for the start of a formula (OWASP "CSV injection").
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_COLUMNS = {
    "agent_id": "agent_id",
    "display_name": "display_name",
    "name": "display_name",
    "consent_reference": "consent_reference",
    "consent": "consent_reference",
    "files": "files",
}


class PlanError(ValueError):
    """The source as a whole cannot be used (unreadable, not a CSV with the columns)."""


class Result(enum.Enum):
    ENROLLED = "enrolled"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class AgentJob:
    agent_id: str
    display_name: str
    consent_reference: str | None
    """None: the agent must exist already."""
    files: list[Path]
    source: str
    """Where it came from, for messages: "row 4", "folder agent-7"."""


@dataclass(frozen=True)
class Outcome:
    agent_id: str
    result: Result
    reason: str = ""


@dataclass
class Plan:
    jobs: list[AgentJob] = field(default_factory=list)
    problems: list[Outcome] = field(default_factory=list)
    """Entries of the source that cannot become a job: reported as failures."""


# --- reading the sources --------------------------------------------------------------------


def plan_from_csv(path: Path) -> Plan:
    base = path.parent.resolve()
    try:
        raw = path.read_bytes()[: MAX_CSV_BYTES + 1]
    except OSError as error:
        raise PlanError(f"{path}: cannot be read ({error.strerror})") from None
    if len(raw) > MAX_CSV_BYTES:
        raise PlanError(f"{path}: larger than {MAX_CSV_BYTES // 2**20} MiB")
    if b"\0" in raw:
        raise PlanError(f"{path}: holds NUL bytes: not a text CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise PlanError(f"{path}: not UTF-8 (byte {error.start})") from None
    rows = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(rows, None)
        if header is None:
            raise PlanError(f"{path}: empty")
        columns = [_COLUMNS.get(name.strip().lower()) for name in header]
        missing = set(_COLUMNS.values()) - set(columns)
        if missing:
            raise PlanError(
                f"{path}: the header must name the columns agent_id, display_name, "
                f"consent_reference, files; missing {', '.join(sorted(missing))}"
            )
        plan = Plan()
        seen: set[str] = set()
        for number, row in enumerate(rows, start=2):
            if number > MAX_ROWS + 1:
                raise PlanError(f"{path}: more than {MAX_ROWS} rows")
            if not any(cell.strip() for cell in row):
                continue
            _add_row(plan, base, number, columns, row, seen)
    except csv.Error as error:
        raise PlanError(f"{path}: not a valid CSV ({error})") from None
    return plan


def _add_row(
    plan: Plan,
    base: Path,
    number: int,
    columns: Sequence[str | None],
    row: list[str],
    seen: set[str],
) -> None:
    label = f"row {number}"
    if len(row) != len(columns):
        plan.problems.append(
            Outcome(label, Result.FAILED, f"{len(row)} cells; the header has {len(columns)}")
        )
        return
    cells = {name: cell.strip() for name, cell in zip(columns, row, strict=True) if name}
    agent_id = cells["agent_id"]
    if not agent_id:
        plan.problems.append(Outcome(label, Result.FAILED, "agent_id is empty"))
        return
    for name in ("agent_id", "display_name", "consent_reference"):
        if cells[name].startswith(_FORMULA_STARTS):
            plan.problems.append(
                Outcome(
                    agent_id if name != "agent_id" else label,
                    Result.FAILED,
                    f"{label}: {name} starts with {cells[name][0]!r}, which spreadsheets run "
                    "as a formula",
                )
            )
            return
    if agent_id in seen:
        plan.problems.append(
            Outcome(agent_id, Result.FAILED, f"{label}: a second row for this agent")
        )
        return
    seen.add(agent_id)
    names = [name.strip() for name in cells["files"].split(FILE_SEPARATOR) if name.strip()]
    files: list[Path] = []
    for name in names:
        inside = _inside(base, name)
        if inside is None:
            plan.problems.append(
                Outcome(
                    agent_id,
                    Result.FAILED,
                    f"{label}: file {name!r} is not inside the CSV's folder {base}",
                )
            )
            return
        files.append(inside)
    if not files:
        plan.problems.append(Outcome(agent_id, Result.FAILED, f"{label}: no files"))
        return
    plan.jobs.append(
        AgentJob(
            agent_id,
            cells["display_name"] or agent_id,
            cells["consent_reference"] or None,
            files,
            label,
        )
    )


def plan_from_folder(folder: Path, consent_reference: str | None) -> Plan:
    if not folder.is_dir():
        raise PlanError(f"{folder}: not a folder")
    base = folder.resolve()
    grouped: dict[str, list[Path]] = {}
    plan = Plan()
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        inside = _inside(base, entry.name)
        if inside is None:
            plan.problems.append(
                Outcome(entry.name, Result.FAILED, f"{entry} links outside {base}")
            )
        elif inside.is_dir():
            files = [
                f
                for f in (_inside(base, str(Path(entry.name) / p.name)) for p in inside.iterdir())
                if f is not None and f.is_file() and not f.name.startswith(".")
            ]
            grouped.setdefault(entry.name, []).extend(sorted(files))
        elif "_" in entry.name:
            grouped.setdefault(entry.name.split("_", 1)[0], []).append(inside)
        else:
            plan.problems.append(
                Outcome(
                    entry.name,
                    Result.FAILED,
                    "a file at the top of the folder must be named AGENT_anything.ext, or go "
                    "in a sub-folder named after its agent",
                )
            )
    for agent_id, files in sorted(grouped.items()):
        if not files:
            plan.problems.append(Outcome(agent_id, Result.FAILED, "no files"))
            continue
        plan.jobs.append(AgentJob(agent_id, agent_id, consent_reference, files, agent_id))
    return plan


def _inside(base: Path, name: str) -> Path | None:
    """`name` under `base`, links resolved, or None when it is absolute or ends up outside."""
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    resolved = (base / relative).resolve()
    return resolved if resolved.is_relative_to(base) else None


# --- running it ------------------------------------------------------------------------------


class Progress:
    """A plain progress bar on stderr: redrawn in place on a terminal, one line per agent
    otherwise (a log file)."""

    _WIDTH = 30

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self._total = total
        self._stream = stream or sys.stderr
        self._tty = self._stream.isatty()

    def show(self, done: int, label: str) -> None:
        filled = self._WIDTH * done // max(self._total, 1)
        bar = "#" * filled + "." * (self._WIDTH - filled)
        line = f"[{bar}] {done}/{self._total} {label}"
        if self._tty:
            self._stream.write(f"\r{line[:100]:<100}")
        else:
            self._stream.write(line + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


class BulkEnrollment:
    def __init__(self, client: EnrollmentClient, max_seconds: float, raw_rate: int = 0) -> None:
        self._client = client
        self._max_seconds = max_seconds
        self._raw_rate = raw_rate

    def run(self, plan: Plan, progress: Progress) -> list[Outcome]:
        outcomes = list(plan.problems)
        for done, job in enumerate(plan.jobs, start=1):
            progress.show(done - 1, job.agent_id)
            outcome, unreachable = self._enroll(job)
            outcomes.append(outcome)
            progress.show(done, f"{job.agent_id}: {outcome.result.value}")
            if unreachable:
                # Every other agent would wait for the same server: they are left for a re-run.
                outcomes += [
                    Outcome(later.agent_id, Result.FAILED, "not tried: the server is unreachable")
                    for later in plan.jobs[done:]
                ]
                break
        progress.close()
        return outcomes

    def _enroll(self, job: AgentJob) -> tuple[Outcome, bool]:
        """The agent's outcome, and whether the server was unreachable."""
        try:
            files = [AudioFile.from_path(path, self._raw_rate) for path in job.files]
            for audio in files:
                audio.check(self._max_seconds)
        except AudioFileError as error:
            return Outcome(job.agent_id, Result.FAILED, str(error)), False
        try:
            return self._enroll_checked(job, files), False
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else str(error)
            outcome = Outcome(job.agent_id, Result.FAILED, f"{code.name}: {details}")
            return outcome, code is grpc.StatusCode.UNAVAILABLE

    def _enroll_checked(self, job: AgentJob, files: list[AudioFile]) -> Outcome:
        try:
            status = self._client.status(job.agent_id)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            if job.consent_reference is None:
                return Outcome(
                    job.agent_id,
                    Result.FAILED,
                    "a new agent: give its consent reference (--consent, or the CSV column)",
                )
            self._client.create_agent(job.agent_id, job.display_name, job.consent_reference)
        else:
            if status.HasField("voiceprint"):
                return Outcome(job.agent_id, Result.SKIPPED, "already enrolled")
        not_accepted = []
        for audio in files:
            utterance = self._client.add_utterance(job.agent_id, audio).utterance
            if not utterance.accepted:
                not_accepted.append(f"{audio.path.name}: {utterance.rejection_reason}")
        try:
            result = self._client.finalize(job.agent_id)
        except grpc.RpcError as error:
            if not isinstance(error, grpc.Call) or error.code() not in (
                grpc.StatusCode.FAILED_PRECONDITION,
            ):
                raise
            reasons = [str(error.details()), *not_accepted]
            return Outcome(job.agent_id, Result.FAILED, "; ".join(reasons))
        return Outcome(
            job.agent_id,
            Result.ENROLLED,
            f"{result.voiceprint.utterance_count} utterance(s), "
            f"{result.voiceprint.net_speech_seconds:.1f} s net speech",
        )


def summary(outcomes: Iterable[Outcome]) -> str:
    outcomes = list(outcomes)
    counts = {result: sum(o.result is result for o in outcomes) for result in Result}
    lines = [
        f"enrolled {counts[Result.ENROLLED]}, skipped {counts[Result.SKIPPED]}, "
        f"failed {counts[Result.FAILED]}"
    ]
    for outcome in outcomes:
        if outcome.result is not Result.ENROLLED:
            lines.append(f"  {outcome.result.value} {outcome.agent_id}: {outcome.reason}")
    return "\n".join(lines)


def spreadsheet_safe(cell: str) -> str:
    """`cell` as a CSV cell no spreadsheet runs as a formula (a leading quote, as OWASP
    recommends for cells starting with = + - @ tab or CR)."""
    return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def write_report(outcomes: Iterable[Outcome], out: TextIO) -> None:
    writer = csv.writer(out)
    writer.writerow(["agent_id", "result", "reason"])
    for outcome in outcomes:
        writer.writerow(
            [
                spreadsheet_safe(outcome.agent_id),
                outcome.result.value,
                spreadsheet_safe(outcome.reason),
            ]
        )
