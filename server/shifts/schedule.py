"""When a shift's checkpoints fall: at random times the softphone cannot predict."""

from __future__ import annotations

import secrets

from server.config import ShiftPolicy


class CheckpointSchedule:
    """Draws checkpoint intervals the client cannot predict: the mean interval plus a uniform
    offset within +/- jitter, from the operating system's cryptographic source, never shorter
    than the minimum gap."""

    _RESOLUTION = 1_000_000

    def __init__(self, policy: ShiftPolicy) -> None:
        self._policy = policy

    def next_interval(self) -> float:
        p = self._policy
        fraction = secrets.randbelow(self._RESOLUTION + 1) / self._RESOLUTION
        interval = (
            p.mean_checkpoint_interval_seconds + (2 * fraction - 1) * p.checkpoint_jitter_seconds
        )
        return max(p.min_checkpoint_gap_seconds, interval)
