"""The test clock: every test that needs time to pass moves this one (the same clock the
benchmarks simulate shifts on: server.runtime.clock.ManualClock)."""

from __future__ import annotations

from server.runtime.clock import ManualClock

__all__ = ["ManualClock"]
