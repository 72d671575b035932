"""One bound on the audio that all requests in progress hold together, encoded and decoded.

Per-request limits (AudioLimits) bound one upload; they do not bound forty at once. Each
request takes an AudioReservation and claims bytes from it before it holds them (a received
message, a chunk appended to a buffer, a decoded or resampled waveform); a claim the budget
cannot meet raises AudioBudgetExceededError at once, before the bytes are kept, and the request
ends RESOURCE_EXHAUSTED. A reservation returns everything it claimed when it is closed, on
every path out of the request (answered, refused, failed, cancelled).

Work handed to a worker thread holds the audio while it runs, and a cancelled call cannot stop
a running thread: `AudioReservation.held_by` keeps the bytes claimed until that work is done.

When the last reservation returns its bytes, the memory freed is handed back to the operating
system (server/runtime/memory.py): glibc would otherwise keep the heap at the burst's peak.
Measured with two rounds of tests/e2e/test_upload_memory.py's uploads (40 concurrent 20 MB
streams, then 40 of 59 s) against one `voxauth serve` with the real model, idle at 1.09 GB:
RSS after them 1.45 GB with the trim, 1.82 GB without (peak 1.68 and 1.84 GB), at 0.2-3 ms a
trim. MALLOC_ARENA_MAX=2 gave 1.77 GB without the trim and 1.42 GB with it: too little to set.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from types import TracebackType
from typing import TypeVar

from server.errors import AudioBudgetExceededError
from server.runtime.memory import return_freed_memory

T = TypeVar("T")

# The budget frees as soon as the requests in progress are answered, within a second or two:
# a short wait, not a back-off, is the useful hint.
_RETRY_AFTER_SECONDS = 1.0


class AudioBudget:
    """Thread-safe: claims come from the event loop (streams) and from workers (decoding)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """Bytes claimed by the reservations open now."""
        with self._lock:
            return self._held

    def reserve(self) -> AudioReservation:
        """A reservation holding nothing yet; close it (or use it as a context manager)."""
        return AudioReservation(self)

    def _claim(self, nbytes: int) -> None:
        with self._lock:
            if self._held + nbytes > self.limit_bytes:
                held = self._held
            else:
                self._held += nbytes
                return
        raise AudioBudgetExceededError(
            f"the server holds as much audio as it may ({held / 2**20:.0f} MiB of "
            f"{self.limit_bytes / 2**20:.0f} MiB across the uploads in progress; this one "
            f"needs {nbytes / 2**20:.1f} MiB more); retry shortly",
            retry_after_seconds=_RETRY_AFTER_SECONDS,
        )

    def _return(self, nbytes: int) -> None:
        with self._lock:
            self._held -= nbytes
            idle = self._held == 0
        if idle and nbytes:
            return_freed_memory()


class AudioReservation:
    """The audio one request holds. Thread-safe."""

    def __init__(self, budget: AudioBudget) -> None:
        self._budget = budget
        self._held = 0
        self._workers = 0
        self._closed = False
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def claim(self, nbytes: int) -> None:
        """Claims `nbytes` more before holding them; raises AudioBudgetExceededError, claiming
        nothing, when the budget cannot spare them."""
        if nbytes <= 0:
            return
        self._budget._claim(nbytes)
        with self._lock:
            self._held += nbytes

    def held_by(self, work: Callable[[], T]) -> Callable[[], T]:
        """`work`, for a worker thread, keeping the reservation's bytes claimed while it runs
        even if the reservation is closed meanwhile (its call cancelled). Work that starts
        only after the close is not done: nobody waits for its result."""

        def holding() -> T:
            with self._lock:
                if self._closed:
                    raise CancelledError("the call ended before its audio was analysed")
                self._workers += 1
            try:
                return work()
            finally:
                with self._lock:
                    self._workers -= 1
                    last = self._closed and self._workers == 0
                if last:
                    self._return_all()

        return holding

    def close(self) -> None:
        """Returns every claimed byte to the budget, or, while a worker still holds the audio,
        has that worker return them when it is done. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            busy = self._workers > 0
        if not busy:
            self._return_all()

    def _return_all(self) -> None:
        with self._lock:
            held, self._held = self._held, 0
        self._budget._return(held)

    def __enter__(self) -> AudioReservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
