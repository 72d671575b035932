"""Wake-ups for the replicas' event bus (server/shifts/event_bus.py) by LISTEN/NOTIFY: every
shift event committed on any replica NOTIFYs EVENTS_CHANNEL in its transaction (so only
committed events are announced), and each replica LISTENs on a connection of its own.

A notification is only a hint: the bus reads the events table by id, so one missed (while
the connection was down, or PostgreSQL restarted) loses nothing. After every (re)connection
the listener wakes the bus once, which then catches up from the last id it delivered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from server.storage.postgresql.backend import EVENTS_CHANNEL

log = logging.getLogger(__name__)

_RETRY_SECONDS = 1.0
"""Between attempts to reconnect: PostgreSQL restarting takes about that long."""
_POLL_SECONDS = 1.0
"""How often the listening thread looks up from waiting, to notice close()."""


class PostgresEventWakeups:
    """EventWakeups (server/storage/interface.py) for PostgreSQL."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, woken: Callable[[], None]) -> None:
        self._thread = threading.Thread(
            target=self._listen, args=(woken,), name="voxauth-event-listener", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(_POLL_SECONDS * 3)

    def _listen(self, woken: Callable[[], None]) -> None:
        while not self._closed.is_set():
            try:
                with psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    woken()  # Whatever committed while no one listened.
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=_POLL_SECONDS):
                            woken()
            except psycopg.Error as error:
                log.warning("shift event listener disconnected (%s); reconnecting", error)
                self._closed.wait(_RETRY_SECONDS)
            except Exception:
                # Anything else must not end the thread either: a replica whose listener has
                # died hears the others' events only at the bus's slow poll, and says nothing.
                log.exception("shift event listener failed; reconnecting")
                self._closed.wait(_RETRY_SECONDS)
