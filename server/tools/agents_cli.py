"""`voxauth agents ...`: HR's view of every agent, and enrolling a team at once.

    voxauth agents list [--state S]... [--older-than-days N] [--expires-within-days N]
                        [--prefix P] [--format table|csv|json]
    voxauth agents show AGENT_ID
    voxauth agents enroll-bulk (FOLDER | FILE.csv) [--consent REF] [--report FILE.csv]

Exit codes as `voxauth`'s; enroll-bulk exits 6 when any agent failed (the others are done).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from voxauth.v1 import voxauth_pb2 as pb

from server.config import AudioLimits
from server.tools.bulk_enroll import (
    BulkEnrollment,
    PlanError,
    Progress,
    Result,
    plan_from_csv,
    plan_from_folder,
    spreadsheet_safe,
    summary,
    write_report,
)
from server.tools.client import EnrollmentClient

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INCOMPLETE = 6
"""enroll-bulk: some agents failed; the summary says which and why."""

ClientOptions = Callable[[argparse.ArgumentParser, str], None]
OpenChannel = Callable[[argparse.Namespace], grpc.Channel]

_STATES = {
    "not-started": pb.ENROLLMENT_STATE_NOT_STARTED,
    "collecting": pb.ENROLLMENT_STATE_COLLECTING,
    "ready": pb.ENROLLMENT_STATE_READY_TO_FINALIZE,
    "enrolled": pb.ENROLLMENT_STATE_ENROLLED,
}
_STATE_NAMES = {number: name for name, number in _STATES.items()}


def add_commands(commands: Any, client_options: ClientOptions, open_channel: OpenChannel) -> Any:
    """Adds `agents` and its sub-commands to `voxauth`'s parser (`commands`: its
    sub-parsers) and returns the group's sub-parsers, for the commands other modules add
    to it. Each sub-command is one function here taking the parsed arguments and an open
    channel."""
    agents = commands.add_parser("agents", help="list and show agents; enroll a team at once")
    sub = agents.add_subparsers(required=True, metavar="SUBCOMMAND")

    listing = sub.add_parser("list", help="every agent with its enrollment state")
    client_options(listing, "hr")
    listing.add_argument(
        "--state", action="append", choices=sorted(_STATES), default=[], help="repeatable"
    )
    listing.add_argument("--older-than-days", type=float, default=0.0, help="voiceprint age")
    listing.add_argument(
        "--expires-within-days", type=float, default=0.0, help="voiceprint erased within"
    )
    listing.add_argument("--prefix", default="", help="agent ids starting with this")
    listing.add_argument("--page-size", type=int, default=0, help="agents per call")
    listing.add_argument("--format", choices=("table", "csv", "json"), default="table")
    listing.set_defaults(command=_with_channel(open_channel, _list))

    show = sub.add_parser("show", help="one agent: state, pending speech, voiceprint")
    client_options(show, "hr")
    show.add_argument("agent_id")
    show.set_defaults(command=_with_channel(open_channel, _show))

    bulk = sub.add_parser(
        "enroll-bulk",
        help="enroll every agent of a folder (one sub-folder, or AGENT_*.ext files, per agent) "
        "or a CSV (agent_id, display_name, consent_reference, files); a re-run skips the "
        "enrolled",
    )
    client_options(bulk, "hr")
    bulk.add_argument("source", type=Path, metavar="FOLDER_OR_CSV")
    bulk.add_argument("--consent", help="consent reference of the folder's new agents")
    bulk.add_argument("--report", type=Path, help="also write the outcome per agent as CSV")
    bulk.set_defaults(command=_with_channel(open_channel, _enroll_bulk))

    # HR's approval of a voiceprint held for review (issue 14, point 2) goes here as
    # `sub.add_parser("approve", ...)`, with its function below.
    return sub


def _with_channel(
    open_channel: OpenChannel, command: Callable[[argparse.Namespace, grpc.Channel], int]
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        with open_channel(args) as channel:
            return command(args, channel)

    return run


def _list(args: argparse.Namespace, channel: grpc.Channel) -> int:
    agents = EnrollmentClient(channel, args.timeout).list_agents(
        states=[_STATES[name] for name in args.state],
        older_than_days=args.older_than_days,
        expires_within_days=args.expires_within_days,
        agent_id_prefix=args.prefix,
        page_size=args.page_size,
    )
    if args.format == "json":
        for summary_ in agents:
            print(json.dumps(MessageToDict(summary_), sort_keys=True))
        return EXIT_OK
    rows = (_row(summary_) for summary_ in agents)
    header = ["agent_id", "display_name", "state", "pending_s", "enrolled", "expires"]
    if args.format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(header)
        for row in rows:
            writer.writerow([spreadsheet_safe(cell) for cell in row])
        return EXIT_OK
    print(f"{header[0]:<24} {header[1]:<24} {header[2]:<12} {'pending':>8}  enrolled    expires")
    for row in rows:
        print(f"{row[0]:<24} {row[1][:24]:<24} {row[2]:<12} {row[3]:>8}  {row[4]:<10}  {row[5]}")
    return EXIT_OK


def _row(summary_: pb.AgentSummary) -> list[str]:
    expires = (
        f"{summary_.voiceprint_expires_at.ToDatetime():%Y-%m-%d}"
        if summary_.HasField("voiceprint_expires_at")
        else "-"
    )
    state = _STATE_NAMES.get(summary_.enrollment_state, str(summary_.enrollment_state))
    created = (
        f"{summary_.voiceprint.created_at.ToDatetime():%Y-%m-%d}"
        if summary_.HasField("voiceprint")
        else "-"
    )
    return [
        summary_.agent.agent_id,
        summary_.agent.display_name,
        state,
        f"{summary_.net_speech_seconds:.1f}s",
        created,
        expires,
    ]


def _show(args: argparse.Namespace, channel: grpc.Channel) -> int:
    client = EnrollmentClient(channel, args.timeout)
    status = client.status(args.agent_id)
    listed = next(
        (
            s
            for s in client.list_agents(agent_id_prefix=args.agent_id)
            if s.agent.agent_id == args.agent_id
        ),
        None,
    )
    agent = status.agent
    print(f"agent        {agent.agent_id}")
    print(f"name         {agent.display_name}")
    print(f"consent      {agent.consent_reference}")
    print(f"created      {agent.created_at.ToDatetime():%Y-%m-%d %H:%M} UTC")
    if listed is not None:
        state = _STATE_NAMES.get(listed.enrollment_state, str(listed.enrollment_state))
        print(f"state        {state}")
    print(
        f"pending      {len(status.pending_utterances)} utterance(s), "
        f"{status.net_speech_seconds:.1f} s of {status.required_net_speech_seconds:.1f} s"
    )
    if status.HasField("voiceprint"):
        vp = status.voiceprint
        print(
            f"voiceprint   {vp.utterance_count} utterance(s), {vp.net_speech_seconds:.1f} s, "
            f"model {vp.model_id}, made {vp.created_at.ToDatetime():%Y-%m-%d %H:%M} UTC"
        )
        if listed is not None and listed.HasField("voiceprint_expires_at"):
            print(f"last used    {listed.voiceprint_last_used_at.ToDatetime():%Y-%m-%d %H:%M} UTC")
            print(
                f"expires      {listed.voiceprint_expires_at.ToDatetime():%Y-%m-%d %H:%M} UTC "
                "unless a check uses it"
            )
    else:
        print("voiceprint   none")
    return EXIT_OK


def _enroll_bulk(args: argparse.Namespace, channel: grpc.Channel) -> int:
    try:
        if args.source.is_file():
            plan = plan_from_csv(args.source)
        else:
            plan = plan_from_folder(args.source, args.consent)
    except PlanError as error:
        print(f"voxauth: {error}", file=sys.stderr)
        return EXIT_USAGE
    max_seconds = AudioLimits.from_environment().max_seconds
    runner = BulkEnrollment(EnrollmentClient(channel, args.timeout), max_seconds, args.rate)
    outcomes = runner.run(plan, Progress(len(plan.jobs)))
    print(summary(outcomes))
    if args.report:
        with args.report.open("w", newline="", encoding="utf-8") as out:
            write_report(outcomes, out)
    failed = any(outcome.result is Result.FAILED for outcome in outcomes)
    return EXIT_INCOMPLETE if failed else EXIT_OK
