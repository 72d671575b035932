"""Log lines that untrusted input cannot forge.

Caller names, ids, reasons and file names reach log messages from the network. A newline in
one of them (a certificate CN, say) would start what reads as a new, genuine log line, and a
right-to-left override would make a line display other than it reads. The formatter escapes
every control, format and line-separator character in the message, and indents each line of
a traceback, so anything at the start of a line was written by voxauth.
"""

from __future__ import annotations

import logging
import unicodedata

# Unicode categories no log message needs: controls (C0, DEL, C1), format characters (bidi
# overrides and isolates, zero-width characters), line and paragraph separators, surrogates.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
TRACEBACK_INDENT = "    | "
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_untrusted(text: str) -> str:
    """`text` with each unsafe character written as a visible escape (\\n, \\x1b, \\u202e)."""
    if text.isprintable():
        return text  # The common case, and cheap.
    return "".join(_escape(c) if _is_unsafe(c) else c for c in text)


def _is_unsafe(character: str) -> bool:
    return unicodedata.category(character) in _UNSAFE_CATEGORIES


def _escape(character: str) -> str:
    if character in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[character]
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


class SafeFormatter(logging.Formatter):
    """A logging.Formatter whose output has one line per message, escaped, with any traceback
    on indented lines below it."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_untrusted(super().formatMessage(record))

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        return _indent(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indent(super().formatStack(stack_info))


def _indent(block: str) -> str:
    # Escaped line by line, so an exception message cannot end the block early either.
    return "\n".join(TRACEBACK_INDENT + escape_untrusted(line) for line in block.splitlines())


def configure_logging(level: str) -> None:
    """Root logging for `voxauth serve` and the tools: one stderr handler, SafeFormatter."""
    handler = logging.StreamHandler()
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # Warnings would otherwise go to stderr past the formatter.
    logging.captureWarnings(True)
