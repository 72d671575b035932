"""ListShifts (ShiftService): a page of shifts for the supervisor console and `voxauth shifts
list`. Pages are keyed on the last shift handed out (keyset paging), so a shift that starts
while someone pages neither repeats nor shifts the later pages; the page token is that
position, base64url-encoded. It grants nothing: the caller may list every shift anyway, so a
forged token only moves where the page starts, and a malformed one is refused."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime

from voxauth.v1 import shifts_pb2 as spb

from server.api.convert import shift_message
from server.errors import InvalidRequestError
from server.records import ShiftCursor, ShiftState
from server.shifts.service import ShiftService
from server.validation import validate_shift_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# A token holds a time and a shift id (at most 128 characters): longer is not one of ours.
_MAX_TOKEN = 512

_STATES = {
    spb.SHIFT_STATE_VERIFIED: ShiftState.VERIFIED,
    spb.SHIFT_STATE_UNVERIFIED: ShiftState.UNVERIFIED,
    spb.SHIFT_STATE_LOCKED: ShiftState.LOCKED,
    spb.SHIFT_STATE_ENDED: ShiftState.ENDED,
}


async def list_shifts(
    shifts: ShiftService, request: spb.ListShiftsRequest
) -> spb.ListShiftsResponse:
    states = set()
    for value in request.states:
        state = _STATES.get(value)
        if state is None:
            raise InvalidRequestError(
                f"states holds {value}, which is no shift state", field="states"
            )
        states.add(state)
    size = request.page_size or DEFAULT_PAGE_SIZE
    if size > MAX_PAGE_SIZE:
        raise InvalidRequestError(
            f"page_size is {size}; at most {MAX_PAGE_SIZE} are allowed", field="page_size"
        )
    before = decode_page_token(request.page_token) if request.page_token else None
    # One more than asked says whether another page follows without a second query.
    records = await shifts.page(states, size + 1, before)
    response = spb.ListShiftsResponse(shifts=[shift_message(r) for r in records[:size]])
    if len(records) > size:
        response.next_page_token = encode_page_token(ShiftCursor.after(records[size - 1]))
    return response


def encode_page_token(cursor: ShiftCursor) -> str:
    micros = round(cursor.started_at.timestamp() * 1_000_000)
    text = json.dumps([micros, cursor.shift_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_page_token(token: str) -> ShiftCursor:
    refused = InvalidRequestError(
        "page_token is not a next_page_token that ListShifts handed out", field="page_token"
    )
    if len(token) > _MAX_TOKEN:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        micros, shift_id = json.loads(raw)
        if type(micros) is not int or not isinstance(shift_id, str):
            raise ValueError(token)
        started_at = datetime.fromtimestamp(micros / 1_000_000, UTC)
        validate_shift_id(shift_id)
    except (binascii.Error, ValueError, TypeError, OverflowError, OSError, InvalidRequestError):
        raise refused from None
    return ShiftCursor(started_at, shift_id)
