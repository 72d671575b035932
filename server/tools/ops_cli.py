"""Supervisor and admin commands over the gRPC API, each with the caller's own certificate (or
token), so the server's access policy and audit apply exactly as to any other client:

    voxauth shifts list [--state STATE ...] [--limit N] [--json]    (supervisor, admin)
    voxauth shifts show SHIFT_ID                                    (supervisor, admin)
    voxauth shifts unlock SHIFT_ID --reason TEXT                    (supervisor, admin)
    voxauth agents enable-verification AGENT_ID --reason TEXT       (admin)
    voxauth keys rotate                                             (admin)
    voxauth config --remote                                         (admin)

cli.py adds these parsers (with its client options) and runs them like its own commands.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC

import grpc
from voxauth.v1 import admin_pb2
from voxauth.v1 import admin_pb2_grpc as admin_grpc
from voxauth.v1 import shifts_pb2 as spb
from voxauth.v1 import shifts_pb2_grpc as spb_grpc

ChannelFactory = Callable[[argparse.Namespace], grpc.Channel]
ClientOptions = Callable[[argparse.ArgumentParser, str], None]

STATES = {
    "verified": spb.SHIFT_STATE_VERIFIED,
    "unverified": spb.SHIFT_STATE_UNVERIFIED,
    "locked": spb.SHIFT_STATE_LOCKED,
    "ended": spb.SHIFT_STATE_ENDED,
}
_STATE_NAMES = {value: name for name, value in STATES.items()}
# What one ListShifts call asks for: the server's most.
_PAGE = 500


def add_shift_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    client_options: ClientOptions,
    channel: ChannelFactory,
) -> None:
    shifts = commands.add_parser("shifts", help="list, show and unlock shifts (supervisor)")
    actions = shifts.add_subparsers(required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="shifts, the latest started first")
    client_options(listing, "supervisor")
    listing.add_argument(
        "--state",
        action="append",
        choices=sorted(STATES),
        help="only shifts in this state (repeatable; default: all)",
    )
    listing.add_argument(
        "--limit", type=_positive, default=50, help="at most this many (default 50)"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(command=lambda args: _list_shifts(channel, args))

    show = actions.add_parser("show", help="one shift's state and checkpoint counts")
    client_options(show, "supervisor")
    show.add_argument("shift_id")
    show.add_argument("--json", action="store_true", help="as a JSON object")
    show.set_defaults(command=lambda args: _show_shift(channel, args))

    unlock = actions.add_parser(
        "unlock", help="unlock a locked shift after talking to the agent (audited)"
    )
    client_options(unlock, "supervisor")
    unlock.add_argument("shift_id")
    unlock.add_argument("--reason", required=True, help="why, e.g. a ticket (audited)")
    unlock.set_defaults(command=lambda args: _unlock_shift(channel, args))


def add_agent_commands(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    client_options: ClientOptions,
    channel: ChannelFactory,
) -> None:
    """The admin's subcommands of `voxauth agents` (beside its list and show)."""
    enable = actions.add_parser(
        "enable-verification",
        help="re-enable verification for an agent disabled after repeated failures (admin)",
    )
    client_options(enable, "admin")
    enable.add_argument("agent_id")
    enable.add_argument("--reason", required=True, help="why (audited)")
    enable.set_defaults(command=lambda args: _enable_verification(channel, args))


def add_key_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    client_options: ClientOptions,
    channel: ChannelFactory,
) -> None:
    keys = commands.add_parser("keys", help="rotate the assurance signing key (admin)")
    actions = keys.add_subparsers(required=True, metavar="ACTION")
    rotate = actions.add_parser(
        "rotate",
        help="make a new assurance signing key active; the old one stays published until "
        "its tokens expire",
    )
    client_options(rotate, "admin")
    rotate.set_defaults(command=lambda args: _rotate_key(channel, args))


def remote_configuration(channel: ChannelFactory, args: argparse.Namespace) -> int:
    """`voxauth config --remote`: the running server's effective configuration."""
    with channel(args) as opened:
        stub = admin_grpc.AdminServiceStub(opened)
        document = stub.GetConfiguration(admin_pb2.GetConfigurationRequest(), timeout=args.timeout)
    print(document.json)
    return 0


# --- the commands -----------------------------------------------------------------------------


def _list_shifts(channel: ChannelFactory, args: argparse.Namespace) -> int:
    states = [STATES[name] for name in args.state or ()]
    with channel(args) as opened:
        shifts = list(_shifts(spb_grpc.ShiftServiceStub(opened), states, args.limit, args.timeout))
    if args.json:
        for shift in shifts:
            print(json.dumps(shift_json(shift), sort_keys=True))
        return 0
    print(f"{'shift':<24} {'agent':<20} {'state':<10} {'started (UTC)':<16} passed/failed/short")
    for shift in shifts:
        row = shift_json(shift)
        print(
            f"{_cell(row['shift_id'], 24)} {_cell(row['agent_id'], 20)} {row['state']:<10} "
            f"{shift.started_at.ToDatetime(tzinfo=UTC):%Y-%m-%d %H:%M} "
            f"{row['checkpoints_passed']}/{row['checkpoints_failed']}/"
            f"{row['checkpoints_insufficient_speech']}"
        )
    print(f"{len(shifts)} shift(s)")
    return 0


def _shifts(
    stub: spb_grpc.ShiftServiceStub,
    states: list[spb.ShiftState.ValueType],
    limit: int,
    timeout: float,
) -> Iterator[spb.Shift]:
    token, left = "", limit
    while left > 0:
        page = stub.ListShifts(
            spb.ListShiftsRequest(states=states, page_size=min(left, _PAGE), page_token=token),
            timeout=timeout,
        )
        yield from page.shifts
        left -= len(page.shifts)
        token = page.next_page_token
        if not token:
            return


def _show_shift(channel: ChannelFactory, args: argparse.Namespace) -> int:
    with channel(args) as opened:
        shift = spb_grpc.ShiftServiceStub(opened).GetShift(
            spb.GetShiftRequest(shift_id=args.shift_id), timeout=args.timeout
        )
    row = shift_json(shift)
    if args.json:
        print(json.dumps(row, sort_keys=True))
    else:
        for key, value in row.items():
            print(f"{key}: {'' if value is None else value}")
    return 0


def _unlock_shift(channel: ChannelFactory, args: argparse.Namespace) -> int:
    # One request id for this command: a retry after a lost answer does not unlock twice.
    request = admin_pb2.UnlockShiftRequest(
        shift_id=args.shift_id, reason=args.reason, request_id=str(uuid.uuid4())
    )
    with channel(args) as opened:
        shift = admin_grpc.AdminServiceStub(opened).UnlockShift(request, timeout=args.timeout)
    print(f"shift {shift.shift_id} of {shift.agent_id} unlocked: {_STATE_NAMES[shift.state]}")
    return 0


def _enable_verification(channel: ChannelFactory, args: argparse.Namespace) -> int:
    request = admin_pb2.EnableVerificationRequest(
        agent_id=args.agent_id, reason=args.reason, request_id=str(uuid.uuid4())
    )
    with channel(args) as opened:
        admin_grpc.AdminServiceStub(opened).EnableVerification(request, timeout=args.timeout)
    print(f"verification re-enabled for {args.agent_id}")
    return 0


def _rotate_key(channel: ChannelFactory, args: argparse.Namespace) -> int:
    request = admin_pb2.RotateSigningKeyRequest(request_id=str(uuid.uuid4()))
    with channel(args) as opened:
        rotated = admin_grpc.AdminServiceStub(opened).RotateSigningKey(
            request, timeout=args.timeout
        )
    print(f"new active signing key: {rotated.key_id}")
    return 0


# --- output -----------------------------------------------------------------------------------


def shift_json(shift: spb.Shift) -> dict[str, object]:
    def at(field: str) -> str | None:
        if not shift.HasField(field):  # type: ignore[arg-type]
            return None
        stamp = getattr(shift, field).ToDatetime(tzinfo=UTC)
        return str(stamp.isoformat(timespec="seconds"))

    return {
        "shift_id": shift.shift_id,
        "agent_id": shift.agent_id,
        "device_id": shift.device_id,
        "state": _STATE_NAMES.get(shift.state, "unspecified"),
        "started_at": at("started_at"),
        "updated_at": at("updated_at"),
        "ended_at": at("ended_at"),
        "consecutive_failures": shift.consecutive_failures,
        "checkpoints_passed": shift.checkpoints_passed,
        "checkpoints_failed": shift.checkpoints_failed,
        "checkpoints_insufficient_speech": shift.checkpoints_insufficient_speech,
    }


def _cell(value: object, width: int) -> str:
    # Ids are validated server-side, but a terminal is no place to trust a server's text.
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def _positive(text: str) -> int:
    try:
        value = int(text)
        if value < 1:
            raise ValueError(text)
        return value
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number above 0") from None
