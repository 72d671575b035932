"""The server's log lines (server/runtime/log_format.py): JSON lines or text as the setting and
the terminal say, each with the request id of its call (through the gRPC edge and onto the
worker threads), untrusted text escaped, and agents under pseudonyms that erasure unlinks."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from server.config import LogConfig, StoreLimits
from server.errors import ConfigurationError
from server.runtime.log_format import (
    PSEUDONYMS,
    TEXT_FORMAT,
    JsonFormatter,
    RequestIdFilter,
    SafeFormatter,
    configure_logging,
    logged_agent,
    use_json,
)
from server.runtime.request_context import current_request_id, request_scope
from server.runtime.store_pool import StorePool
from tests.support import api_server, make_config

GET_SHIFT = "/voxauth.v1.ShiftService/GetShift"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level, enabled = list(root.handlers), root.level, PSEUDONYMS.enabled
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        PSEUDONYMS.enabled = enabled
        logging.captureWarnings(False)


def capture(formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test.log_format.{id(output)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, output


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert not use_json("auto", Terminal())
    assert use_json("auto", io.StringIO())
    assert use_json("json", Terminal())
    assert not use_json("text", io.StringIO())
    with pytest.raises(ConfigurationError, match="VOXAUTH_LOG_FORMAT"):
        LogConfig.from_environment({"VOXAUTH_LOG_FORMAT": "xml"})
    assert LogConfig.from_environment({"VOXAUTH_LOG_PSEUDONYMS": "0"}).agent_pseudonyms is False


def test_configure_logging_writes_json_lines_off_a_terminal(restore_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", format_name="auto", stream=stream)
    with request_scope("call-1"):
        logging.getLogger("server.test").info("verify agent=%s ACCEPT", logged_agent("a1"))

    [line] = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "INFO"
    assert entry["logger"] == "server.test"
    assert entry["request_id"] == "call-1"
    assert entry["agent"] == PSEUDONYMS.of("a1")
    assert entry["message"] == f"verify agent={PSEUDONYMS.of('a1')} ACCEPT"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", entry["time"])


def test_a_json_line_cannot_be_split_or_disguised_by_untrusted_text() -> None:
    logger, output = capture(JsonFormatter())
    try:
        raise ValueError("bad\nINFO forged: line")
    except ValueError:
        logger.exception("caller %s", "m\nINFO server: forged\u202e")

    [line] = output.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["message"] == "caller m\\nINFO server: forged\\u202e"
    assert "ValueError: bad\\nINFO forged: line" in entry["exception"]
    assert "request_id" not in entry  # outside any call


def test_text_lines_name_the_request_and_stay_one_line_each() -> None:
    logger, output = capture(SafeFormatter(TEXT_FORMAT))
    logger.info("outside")
    with request_scope("call-2"):
        logger.warning("inside\n%s", "FORGED")

    lines = output.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith(" INFO " + logger.name + ": outside")
    assert lines[1].endswith(f" WARNING {logger.name} [call-2]: inside\\nFORGED")


def test_agents_are_pseudonyms_stable_until_the_key_is_forgotten(restore_logging: None) -> None:
    logger, output = capture(SafeFormatter("%(message)s"))
    PSEUDONYMS.enabled = True
    first = PSEUDONYMS.of("agent-042")
    assert re.fullmatch(r"anon-[0-9a-f]{16}", first)
    assert PSEUDONYMS.of("agent-042") == first != PSEUDONYMS.of("agent-043")

    logger.info("agent=%s", logged_agent("agent-042"))
    PSEUDONYMS.forget()  # an erasure
    logger.info("agent=%s", logged_agent("agent-042"))
    PSEUDONYMS.enabled = False  # VOXAUTH_LOG_PSEUDONYMS=0
    logger.info("agent=%s", logged_agent("agent-042"))

    before, after, clear = output.getvalue().splitlines()
    assert before == f"agent={first}"
    assert after.startswith("agent=anon-") and after != before
    assert clear == "agent=agent-042"


def test_work_on_the_store_threads_logs_under_the_callers_request() -> None:
    logger, output = capture(SafeFormatter("%(request)s %(message)s"))
    pool = StorePool(StoreLimits(workers=2))

    async def call() -> None:
        with request_scope("call-3"):
            await pool.run(lambda: logger.info("in the store"))

    try:
        asyncio.run(call())
    finally:
        pool.shutdown()
    assert output.getvalue() == " [call-3] in the store\n"


def test_each_grpc_call_logs_its_status_under_its_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with (
            api_server(make_config(tmp_path)) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            call = channel.unary_unary(
                GET_SHIFT, request_serializer=bytes, response_deserializer=bytes
            )
            for offered in ("client-7", "not acceptable!"):
                with pytest.raises(grpc.aio.AioRpcError):
                    await call(b"", metadata=[("x-request-id", offered)], timeout=10)

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO, logger="server.api.observability"):
        asyncio.run(scenario())

    ended = [r for r in caplog.records if r.name == "server.api.observability"]
    assert [r.getMessage().split(" ")[:3] for r in ended] == [["rpc", GET_SHIFT, "UNAVAILABLE"]] * 2
    request_ids = [getattr(r, "request_id", None) for r in ended]
    assert request_ids[0] == "client-7"
    # An id that is not 1-128 of [A-Za-z0-9._:-] is not taken into the log: a fresh one is.
    assert re.fullmatch(r"[0-9a-f]{24}", str(request_ids[1]))


def test_a_request_scope_closed_from_another_context_does_not_fail() -> None:
    scope = request_scope("call-4")
    contextvars.copy_context().run(scope.__enter__)
    scope.__exit__(None, None, None)  # in this context the id was never set
    assert current_request_id() is None


def test_logging_to_stderr_follows_stderr_when_it_is_swapped_and_closed(
    restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server thread that logs after the stderr it started with was replaced and closed (a
    test's captured output, a redirect) writes to the stderr of now, not into a closed file."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", format_name="text")
    logging.getLogger("server.test").info("while the first stderr is open")
    assert "while the first stderr is open" in first.getvalue()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    errors: list[BaseException | None] = []

    def failed(_handler: logging.Handler, _record: logging.LogRecord) -> None:
        errors.append(sys.exc_info()[1])  # what logging would print as "--- Logging error ---"

    monkeypatch.setattr(logging.Handler, "handleError", failed)
    logging.getLogger("server.test").info("after it was closed")
    assert errors == []
    assert "after it was closed" in second.getvalue()
