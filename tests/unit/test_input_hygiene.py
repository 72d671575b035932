"""Untrusted text: free-text fields refuse what could disguise a record, and log lines escape
what could forge one (issue 10, items 6 and 8)."""

from __future__ import annotations

import io
import logging

import pytest

from server.errors import InvalidRequestError
from server.runtime.log_format import TRACEBACK_INDENT, SafeFormatter, escape_untrusted
from server.validation import validate_text

FORGED_LINE = "2026-12-01 12:00:00,000 INFO server.verification: verify agent=boss ACCEPT"


@pytest.mark.parametrize(
    ("character", "what"),
    [
        ("\x7f", "a control character"),  # DELETE has no Unicode name
        ("\x85", "a control character"),  # C1 NEXT LINE has no Unicode name
        ("\x9b", "a control character"),  # C1 CONTROL SEQUENCE INTRODUCER
        ("\u202e", "RIGHT-TO-LEFT OVERRIDE"),
        ("\u2066", "LEFT-TO-RIGHT ISOLATE"),
        ("\u200b", "ZERO WIDTH SPACE"),
        ("\u2028", "LINE SEPARATOR"),
        ("\n", "a control character"),
        ("\ue000", "a control character"),  # private use
    ],
)
@pytest.mark.parametrize("field", ["display_name", "consent_reference", "reason"])
def test_text_fields_refuse_hidden_characters_naming_the_field(
    character: str, what: str, field: str
) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        validate_text(f"Jane{character}Doe", field, 200)
    assert refused.value.field == field
    assert f"U+{ord(character):04X}" in refused.value.message
    assert f"({what})" in refused.value.message


PERSIAN_WITH_ZWNJ = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"


@pytest.mark.parametrize(
    "text", ["Jane Doe", "José Müller-Łukasz", "李小龍", PERSIAN_WITH_ZWNJ, "O'Brien (HR #12)"]
)
def test_text_fields_keep_real_names(text: str) -> None:
    assert validate_text(f"  {text} ", "display_name", 200) == text


def test_escaping_leaves_plain_text_alone_and_makes_hidden_characters_visible() -> None:
    assert escape_untrusted("verify agent=a1 ACCEPT") == "verify agent=a1 ACCEPT"
    assert escape_untrusted("a\nb\r\tc\x1b[31m\u202ed\x85") == "a\\nb\\r\\tc\\x1b[31m\\u202ed\\x85"


def _format(record: logging.LogRecord) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("%(levelname)s %(name)s: %(message)s"))
    handler.emit(record)
    return stream.getvalue()


def test_a_caller_name_with_a_newline_cannot_start_a_log_line() -> None:
    record = logging.LogRecord(
        "server.api.access",
        logging.WARNING,
        __file__,
        1,
        "refused %s: %s (caller %s)",
        ("/voxauth.v1.AdminService/Unlock", "PERMISSION_DENIED", f"mallory\n{FORGED_LINE}"),
        None,
    )
    lines = _format(record).splitlines()
    assert len(lines) == 1
    assert not any(line.startswith(FORGED_LINE) for line in lines)
    assert "mallory\\n2026-12-01" in lines[0]


def test_a_traceback_is_indented_so_its_message_cannot_pose_as_a_log_line() -> None:
    try:
        raise ValueError(f"bad id\n{FORGED_LINE}")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "server", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    lines = _format(record).splitlines()
    assert lines[0] == "ERROR server: failed"
    assert all(line.startswith(TRACEBACK_INDENT) for line in lines[1:])
    assert not any(line.startswith(FORGED_LINE) for line in lines)
