"""Measures what keeping a checkpoint's event in the checkpoint's own SQLite transaction adds
to it (every server now stores its events, so that subscribers resume by event id;
server/shifts/event_bus.py): N units of a checkpoint's writes (the shift's new state and its
audit record), without and with the event, on a fresh store in a temporary folder.

    PYTHONPATH=$PWD:$PWD/proto .venv/bin/python scripts/measure_event_cost.py [N] [TRIALS]

Prints the mean time per unit of each, per trial. It cannot show contention with other
writers, nor PostgreSQL (which stored events before this change already).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from server.audit_actions import AuditAction
from server.records import AgentRecord, ShiftRecord, ShiftState
from server.security.audit import AuditKey
from server.security.crypto import VoiceprintCipher
from server.shifts.event_bus import encode_event
from server.shifts.events import ShiftEvent, ShiftEventKind
from server.storage.interface import AuditEvent
from server.storage.sqlite import open_store

KEY = bytes(range(32))


def milliseconds_per_unit(units: int, *, with_event: bool) -> float:
    with tempfile.TemporaryDirectory() as folder:
        store = open_store(
            Path(folder) / "voxauth.db", VoiceprintCipher(KEY), audit_key=AuditKey(KEY)
        )
        now = datetime.now(UTC)
        store.create_agent(AgentRecord("agent-1", "Agent 1", "HR-1", now))
        shift = ShiftRecord("shift-1", "agent-1", "phone-1", ShiftState.VERIFIED, now, now)
        with store.unit_of_work("start the shift") as unit:
            unit.create_shift(shift)
        payload = encode_event(ShiftEvent(ShiftEventKind.CHECKPOINT_PASSED, shift, now))
        started = time.perf_counter()
        for n in range(units):
            with store.unit_of_work("a checkpoint") as unit:
                if with_event:
                    unit.append_event("agent-1", payload, now, now - timedelta(hours=1))
                unit.update_shift(replace(shift, checkpoints_passed=n + 1))
                unit.append_audit(
                    AuditEvent(
                        AuditAction.SHIFT_CHECKPOINT, "agent-1", "ACCEPT", now, {"shift_id": "s"}
                    )
                )
        took = (time.perf_counter() - started) / units * 1000
        store.close()
        return took


def main() -> None:
    units = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for trial in range(1, trials + 1):
        without = milliseconds_per_unit(units, with_event=False)
        with_event = milliseconds_per_unit(units, with_event=True)
        print(
            f"trial {trial}: {units} units, without the event {without:.2f} ms each, "
            f"with it {with_event:.2f} ms (added {with_event - without:+.2f} ms)"
        )


if __name__ == "__main__":
    main()
