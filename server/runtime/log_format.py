"""The server's log: JSON lines for a log shipper, or plain text for a terminal, that untrusted
input cannot forge, with the request id of each line's call and agents under pseudonyms.

Caller names, ids, reasons and file names reach log messages from the network. A newline in
one of them (a certificate CN, say) would start what reads as a new, genuine log line, and a
right-to-left override would make a line display other than it reads. Both formatters escape
every control, format and line-separator character in the message; the text one indents each
line of a traceback, so anything at the start of a line was written by voxauth, and the JSON
one keeps each record on one line by JSON's own escaping.

Agents appear in log lines as `logged_agent(agent_id)`: a keyed pseudonym (HMAC-SHA256) by
default. Its key is random, lives only in this process's memory, and is replaced every day and
whenever an agent is erased (server/app.py hears of erasures from the audit log), so once an
agent is erased no one, not even with the service key, can tell which lines were theirs:
erasure reaches the logs. Within one key's life the pseudonym is stable, so one agent's lines
can be followed. `VOXAUTH_LOG_PSEUDONYMS=0` writes ids in clear, for debugging.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import sys
import threading
import time
import unicodedata
from datetime import UTC, datetime
from typing import IO, Any

from server.runtime.request_context import current_request_id

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


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s"
"""The text format: ` [request id]` after the logger's name for lines written for a call."""


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the call it was written for (the filter runs
    on the writing thread, where the call's context is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = current_request_id()
        record.request_id = request_id
        record.request = f" [{request_id}]" if request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: time (UTC, ISO 8601), level, logger, message,
    and where they apply request_id, agent (pseudonyms), exception and stack."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": escape_untrusted(record.getMessage()),
        }
        request_id = getattr(record, "request_id", None) or current_request_id()
        if request_id:
            entry["request_id"] = request_id
        args = record.args if isinstance(record.args, tuple) else ()
        agents = [str(arg) for arg in args if isinstance(arg, LoggedAgent)]
        if agents:
            entry["agent"] = agents[0] if len(agents) == 1 else agents
        if record.exc_info:
            entry["exception"] = escape_untrusted(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = escape_untrusted(self.formatStack(record.stack_info))
        # ensure_ascii off: names in any script stay readable; the escaping above has already
        # made visible every character that could disguise the line.
        return json.dumps(entry, ensure_ascii=False)


_PSEUDONYM_KEY_LIFETIME_SECONDS = 86_400.0


class AgentPseudonyms:
    """Keyed pseudonyms of agent ids for the log (see the module's docstring). Thread-safe."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._key, self._born = secrets.token_bytes(32), time.monotonic()

    def of(self, agent_id: str) -> str:
        if not self.enabled:
            return agent_id
        with self._lock:
            if time.monotonic() - self._born >= _PSEUDONYM_KEY_LIFETIME_SECONDS:
                self._key, self._born = secrets.token_bytes(32), time.monotonic()
            key = self._key
        digest = hmac.new(key, agent_id.encode(), hashlib.sha256).hexdigest()
        return f"anon-{digest[:16]}"

    def forget(self) -> None:
        """A new key: no pseudonym written so far can be linked to its agent any more."""
        with self._lock:
            self._key, self._born = secrets.token_bytes(32), time.monotonic()


PSEUDONYMS = AgentPseudonyms()
"""The process's pseudonyms (one log, one key)."""


class LoggedAgent:
    """An agent id as a log argument: written as its pseudonym, when the line is written."""

    __slots__ = ("_agent_id",)

    def __init__(self, agent_id: str) -> None:
        self._agent_id = agent_id

    def __str__(self) -> str:
        return PSEUDONYMS.of(self._agent_id)

    __repr__ = __str__


def logged_agent(agent_id: str) -> LoggedAgent:
    """`agent_id` for a log line: `log.info("... agent=%s", logged_agent(agent_id))`."""
    return LoggedAgent(agent_id)


def use_json(format_name: str, stream: IO[str]) -> bool:
    """Whether `format_name` (auto, json, text) means JSON lines on `stream`."""
    if format_name == "auto":
        isatty: Any = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return format_name == "json"


class _CurrentStderr(logging.StreamHandler[IO[str]]):
    """A handler on whatever `sys.stderr` is when each record is written, not on the stream
    it was made with: once that stream is swapped out and closed (a test harness capturing
    output per test, a process redirecting its stderr), a thread still logging would write
    into a closed file ("--- Logging error ---") and lose the record."""

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _value: IO[str]) -> None:
        pass  # always the current stderr


def configure_logging(
    level: str,
    *,
    format_name: str = "text",
    agent_pseudonyms: bool = True,
    stream: IO[str] | None = None,
) -> None:
    """Root logging for `voxauth serve` and the tools: one handler on `stream` (stderr), JSON
    lines or escaped text (see `use_json`), each record stamped with its request id."""
    out = sys.stderr if stream is None else stream
    handler: logging.StreamHandler[IO[str]] = (
        _CurrentStderr() if stream is None else logging.StreamHandler(stream)
    )
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(
        JsonFormatter() if use_json(format_name, out) else SafeFormatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    PSEUDONYMS.enabled = agent_pseudonyms
    # Warnings would otherwise go to stderr past the formatter.
    logging.captureWarnings(True)
