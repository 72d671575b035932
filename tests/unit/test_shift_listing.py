"""ListShifts' page tokens: what one page hands out the next call takes back, and anything
else is refused as INVALID_ARGUMENT, never a crash."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from server.api.shift_listing import decode_page_token, encode_page_token
from server.errors import InvalidRequestError
from server.records import ShiftCursor


def test_a_page_token_round_trips_to_the_microsecond() -> None:
    cursor = ShiftCursor(datetime(2026, 12, 1, 9, 30, 12, 345678, UTC), "Ab_c-9")
    assert decode_page_token(encode_page_token(cursor)) == cursor


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "token",
    [
        "not base64 !",
        _b64("not json"),
        _b64("{}"),
        _b64("[1, 2, 3]"),
        _b64('["1", "s1"]'),
        _b64('[1.5, "s1"]'),
        _b64('[true, "s1"]'),
        _b64('[1, "bad id\\n"]'),
        _b64('[1, ""]'),
        _b64(f'[{10**30}, "s1"]'),
        _b64(f'[{-(10**30)}, "s1"]'),
        "A" * 4096,
    ],
)
def test_a_forged_or_garbled_page_token_is_refused(token: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        decode_page_token(token)
    assert refused.value.field == "page_token"
