"""Shift ownership across replicas: a lease in the store, with a fencing token.

Several replicas may serve one store. A shift is owned by one replica at a time: the one that
took its lease last (ShiftLease, server/records.py). Taking it moves the fencing token on, and
every write of the shift's state carries the token its writer holds: the store refuses it
unless that is still the stored one (UnitOfWork.fence_shift), in the same transaction as the
write. So a replica that lost a shift (to a softphone that reconnected elsewhere, across a
network split or a long pause) cannot change it, whatever it still believes.

Who takes the lease:

- A softphone's stream that attaches (StreamShiftAudio), at once. As within one process, the
  newer stream wins: a softphone reconnects because it lost its stream, so waiting for the old
  owner's lease to run out would add its whole length to every failover.
- A one-off write (start, login check, unlock, end) on a replica that may not hold it. It takes
  the lease "detached"; the replica holding the shift's stream takes it back (with the state
  as stored) when it next renews or writes, so an unlock on another replica does not cut the
  stream.

The replica holding a stream renews its leases every third of `lease_seconds`, in one
transaction. A lease it finds taken by a stream elsewhere ends its own stream with
ShiftLeaseLostError (the softphone is on the other replica by then). If it cannot reach the
store for `lease_seconds`, it ends its streams as unavailable, so softphones move to a replica
that can.

The checkpoint schedule lives in the lease: how many checkpoints the shift has decided and when
the next is due. The due time is drawn once and stored before the wait; the checkpoint's outcome
advances the count in the unit of work that stores it, fenced. So a checkpoint is decided once
(a replica that lost the lease mid-checkpoint cannot store its outcome), and a new owner waits
for the stored due time instead of drawing a new one: no failover postpones or skips a
checkpoint, and one that fell due while no replica held the stream runs on the next speech.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Protocol

from server.errors import ShiftLeaseLostError, StorageError, UnavailableError, VoxauthError
from server.records import ShiftLease, ShiftRecord
from server.runtime.clock import Clock
from server.runtime.store_pool import StorePool
from server.shifts.schedule import CheckpointSchedule
from server.storage.interface import Store

log = logging.getLogger(__name__)


class LeasedSession(Protocol):
    """What the lease keeper needs of a shift's session (ShiftSession)."""

    record: ShiftRecord
    lease: ShiftLease | None

    @property
    def streaming(self) -> bool:
        """Whether a softphone's stream is attached here."""

    def retaken(self) -> None:
        """The lease was taken back with the stored state: resume from it."""

    def lost(self, error: VoxauthError) -> None:
        """Another replica owns the shift now: stop, ending the stream with `error`."""


def new_replica_id() -> str:
    """A replica id of the host and a random part: new on every start, so a restarted replica
    never mistakes its predecessor's leases for its own."""
    return f"{socket.gethostname()[:48]}-{secrets.token_hex(6)}"


class ShiftLeases:
    """This replica's side of the shift leases."""

    def __init__(
        self,
        store: Store,
        store_pool: StorePool,
        clock: Clock,
        schedule: CheckpointSchedule,
        lease_seconds: float,
        replica_id: str | None = None,
    ) -> None:
        self._store = store
        self._store_pool = store_pool
        self._clock = clock
        self._schedule = schedule
        self._lease_seconds = lease_seconds
        self.replica_id = replica_id or new_replica_id()
        self._renewer: asyncio.Task[None] | None = None
        self._unreachable_since: float | None = None

    def expiry(self) -> datetime:
        return self._clock.now() + timedelta(seconds=self._lease_seconds)

    # --- taking ---------------------------------------------------------------------------

    async def take_shift(self, shift_id: str, *, attached: bool) -> tuple[ShiftLease, ShiftRecord]:
        """Takes the shift's lease for this replica; the shift's state as stored."""
        store, owner, expires_at = self._store, self.replica_id, self.expiry()
        return await self._store_pool.run(
            lambda: store.take_shift_lease(
                shift_id, owner, attached=attached, expires_at=expires_at
            )
        )

    async def take(self, session: LeasedSession, *, attached: bool) -> None:
        """Takes the session's shift, reloading its state: another replica may have changed
        it since this one last held it."""
        lease, record = await self.take_shift(session.record.shift_id, attached=attached)
        session.lease, session.record = lease, record

    async def recover(self, session: LeasedSession, stored: ShiftLease | None) -> bool:
        """After the session found its lease lost (`stored`: the lease as stored now): takes it
        back if a one-off write took it and the stream is still here (True); otherwise ends
        the session."""
        if stored is not None and not stored.attached and session.streaming:
            try:
                await self.take(session, attached=True)
            except VoxauthError as error:
                session.lost(error)
                return False
            session.retaken()
            return True
        owner = stored.owner if stored is not None else "nobody"
        session.lost(ShiftLeaseLostError(f"shift {session.record.shift_id} moved to {owner}"))
        return False

    async def recover_stored(self, session: LeasedSession) -> bool:
        """`recover` with the lease as stored now."""
        return await self.recover(session, await self.stored(session.record.shift_id))

    async def confirm(self, session: LeasedSession) -> None:
        """Raises ShiftLeaseLostError unless this replica still holds the session's lease: a
        checkpoint looks before scoring, so a replica that lost the shift (and has not renewed
        since) does not score, and audit, a checkpoint its new owner runs."""
        held, stored = session.lease, await self.stored(session.record.shift_id)
        if held is None or stored is None or stored.token != held.token:
            raise ShiftLeaseLostError(f"shift {session.record.shift_id} moved to another replica")

    async def stored(self, shift_id: str) -> ShiftLease | None:
        store = self._store
        return await self._store_pool.run(lambda: store.shift_lease(shift_id))

    # --- the checkpoint schedule ----------------------------------------------------------

    async def next_due(self, session: LeasedSession) -> float:
        """When (monotonic) the session's next checkpoint is due: the stored time, or one
        drawn now and stored (fenced) before anything waits for it. Raises
        ShiftLeaseLostError."""
        lease = session.lease
        if lease is None:
            raise ShiftLeaseLostError(f"shift {session.record.shift_id} has no lease here")
        if lease.next_checkpoint_at is None:
            # A shift verified before the schedule was stored in its lease.
            planned = replace(lease, next_checkpoint_at=self._draw())
            await self.write(planned)
            session.lease = lease = planned
        assert lease.next_checkpoint_at is not None
        remaining = (lease.next_checkpoint_at - self._clock.now()).total_seconds()
        return self._clock.monotonic() + max(0.0, remaining)

    async def write(self, lease: ShiftLease) -> None:
        """Stores `lease` (its schedule) if this replica still holds it."""
        store = self._store

        def fence() -> None:
            with store.unit_of_work(f"schedule shift {lease.shift_id!r}") as unit:
                unit.fence_shift(lease)

        await self._store_pool.run(fence)

    def scheduled(self, lease: ShiftLease) -> ShiftLease:
        """The lease of a shift that becomes (or stays) verified: its next checkpoint drawn
        now unless one is due already (a login check does not postpone a checkpoint). Stored
        in the unit of work that stores the new state."""
        if lease.next_checkpoint_at is not None:
            return lease
        return replace(lease, next_checkpoint_at=self._draw())

    def decided(
        self, lease: ShiftLease | None, *, verified: bool, scheduled: bool = True
    ) -> ShiftLease | None:
        """The lease once a checkpoint is decided: one more done, and, for the random
        (`scheduled`) one, the next drawn while the shift stays verified; a checkpoint the
        change watch started leaves the random one where it fell. Stored with the
        checkpoint's outcome, so the next owner neither repeats this checkpoint nor skips the
        next."""
        if lease is None:
            return None
        if not verified:
            next_at = None
        elif scheduled or lease.next_checkpoint_at is None:
            next_at = self._draw()
        else:
            next_at = lease.next_checkpoint_at
        return replace(lease, checkpoint_seq=lease.checkpoint_seq + 1, next_checkpoint_at=next_at)

    def _draw(self) -> datetime:
        return self._clock.now() + timedelta(seconds=self._schedule.next_interval())

    # --- renewal --------------------------------------------------------------------------

    def keep_renewed(self, sessions: Callable[[], Iterable[LeasedSession]]) -> None:
        """Renews the leases of the sessions with a stream until there are none."""
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew(sessions), name="shift-leases")

    async def _renew(self, sessions: Callable[[], Iterable[LeasedSession]]) -> None:
        while True:
            await self._clock.sleep_until(self._clock.monotonic() + self._lease_seconds / 3)
            if not await self.renew_once(list(sessions())):
                return

    async def renew_once(self, sessions: list[LeasedSession]) -> bool:
        """One round of renewal over `sessions`; False when none holds a stream."""
        held = {s.lease.shift_id: s for s in sessions if s.streaming and s.lease is not None}
        if not held:
            return False
        store, expires_at = self._store, self.expiry()
        leases = [s.lease for s in held.values() if s.lease is not None]
        try:
            lost = await self._store_pool.run(lambda: store.renew_shift_leases(leases, expires_at))
        except StorageError as error:
            self._unreachable(list(held.values()), error)
            return True
        self._unreachable_since = None
        for shift_id, session in held.items():
            lease = session.lease
            if lease is not None and shift_id not in lost:
                session.lease = replace(lease, expires_at=expires_at)
        for shift_id, stored in lost.items():
            await self.recover(held[shift_id], stored)
        return True

    def _unreachable(self, sessions: list[LeasedSession], error: StorageError) -> None:
        now = self._clock.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        log.warning("cannot renew %d shift leases: %s", len(sessions), error.message)
        if now - self._unreachable_since + self._lease_seconds / 3 >= self._lease_seconds:
            # The leases run out before the next try: another replica that can reach the store
            # must serve these softphones.
            for session in sessions:
                session.lost(UnavailableError("this replica cannot reach the store; reconnect"))

    def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
