"""How the capacity benchmark's softphones log in: as a real softphone should.

A login the server refuses for load (`RESOURCE_EXHAUSTED`: its inference queue is full;
`UNAVAILABLE`: it is starting or draining) is tried again with the same request id, after an
exponential backoff with jitter, and never sooner than the server asked (a
`google.rpc.RetryInfo` detail, or gRPC's `grpc-retry-pushback-ms`). A crowd of softphones
starting at once is paced: at most a bounded number of logins in flight, the others waiting
their turn, and a softphone in backoff holds no turn. Any other refusal is final at once, and
a login that is still refused after its last attempt gives up; either way only that login
fails, never the softphones around it.

Time (`sleep`) and chance (`draw`) are parameters, so the unit tests drive the logic with
fakes and no clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

T = TypeVar("T")
R = TypeVar("R")

RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
"""The refusals that say "not now" rather than "no": a retry later may succeed."""

_DETAILS_KEY = "grpc-status-details-bin"
_PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: the bound doubles from `first` up to `cap`, and each wait is
    drawn from its upper half ("equal jitter": softphones refused together spread out, and
    every wait still grows)."""

    first: float = 0.5
    factor: float = 2.0
    cap: float = 20.0
    attempts: int = 12
    """Tries in all, the first included; with the defaults about 2.5 minutes of waiting."""

    def __post_init__(self) -> None:
        if self.first <= 0 or self.factor < 1 or self.cap < self.first or self.attempts < 1:
            raise ValueError(f"not a backoff: {self}")

    def delay(self, retry: int, draw: float, pushback: float | None = None) -> float:
        """The wait before retry number `retry` (0 for the first), `draw` uniform in [0, 1);
        never shorter than the server's `pushback`."""
        bound = min(self.cap, self.first * self.factor**retry)
        return max(pushback or 0.0, bound / 2 * (1.0 + draw))


def pushback_seconds(error: grpc.RpcError) -> float | None:
    """How long the server asked the caller to wait, if it did: a `google.rpc.RetryInfo`
    detail, or gRPC's retry pushback header (the longer of the two)."""
    trailing = getattr(error, "trailing_metadata", None)
    metadata: Iterable[tuple[str, Any]] = (trailing() if callable(trailing) else None) or ()
    waits: list[float] = []
    for key, value in metadata:
        if key == _PUSHBACK_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            if text.isdigit():  # gRPC: negative or malformed means "do not retry"; ignored here
                waits.append(int(text) / 1000)
        elif key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    waits.append(info.retry_delay.ToTimedelta().total_seconds())
    return max(waits) if waits else None


@dataclass(frozen=True)
class Attempted(Generic[T]):
    """A login's answer and what it took: `attempts` calls, `waited` seconds in backoff."""

    value: T
    attempts: int
    waited: float


class GaveUp(Exception):
    """A login refused on every attempt (or refused for good): the last refusal, and how many
    attempts were made."""

    def __init__(self, error: grpc.RpcError, attempts: int, waited: float) -> None:
        super().__init__(f"{_describe(error)} (after {attempts} attempts)")
        self.error = error
        self.attempts = attempts
        self.waited = waited


class _Turns:
    """The bound on logins in flight, if any."""

    def __init__(self, gate: asyncio.Semaphore | None) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        if self._gate is not None:
            await self._gate.acquire()

    async def __aexit__(self, *_: object) -> None:
        if self._gate is not None:
            self._gate.release()


async def with_retries(
    call: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    sleep: Callable[[float], Awaitable[None]],
    draw: Callable[[], float],
    gate: asyncio.Semaphore | None = None,
) -> Attempted[T]:
    """`call()` until it answers, again after a backoff while the server refuses it for load.
    The caller makes `call` resend the same request id, so a retry whose first attempt did act
    (its answer lost) is answered, not acted on twice. Each attempt holds one of `gate`'s turns;
    the waits between them hold none."""
    waited = 0.0
    for attempt in range(1, backoff.attempts + 1):
        try:
            async with _Turns(gate):
                value = await call()
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == backoff.attempts:
                raise GaveUp(error, attempt, waited) from error
            pause = backoff.delay(attempt - 1, draw(), pushback_seconds(error))
            waited += pause
            await sleep(pause)
        else:
            return Attempted(value, attempt, waited)
    raise AssertionError("unreachable: the last attempt returns or raises")


@dataclass(frozen=True)
class RampTally:
    """What a level's logins took."""

    logins: int
    succeeded: int
    retried: int
    """Logins that needed more than one attempt."""
    retries: int
    """Attempts beyond the first, over all logins."""
    most_attempts: int
    waited: float
    """Seconds spent in backoff, over all logins."""
    failures: list[str]

    @classmethod
    def of(cls, outcomes: Sequence[Attempted[Any] | BaseException]) -> RampTally:
        done = [o for o in outcomes if isinstance(o, Attempted)]
        gave_up = [o for o in outcomes if isinstance(o, GaveUp)]
        attempts = [o.attempts for o in done] + [o.attempts for o in gave_up]
        return cls(
            logins=len(outcomes),
            succeeded=len(done),
            retried=sum(1 for a in attempts if a > 1),
            retries=sum(a - 1 for a in attempts),
            most_attempts=max(attempts, default=0),
            waited=sum(o.waited for o in done) + sum(o.waited for o in gave_up),
            failures=[_describe(o) for o in outcomes if isinstance(o, BaseException)],
        )

    @classmethod
    def merged(cls, tallies: Sequence[RampTally]) -> RampTally:
        return cls(
            logins=sum(t.logins for t in tallies),
            succeeded=sum(t.succeeded for t in tallies),
            retried=sum(t.retried for t in tallies),
            retries=sum(t.retries for t in tallies),
            most_attempts=max((t.most_attempts for t in tallies), default=0),
            waited=sum(t.waited for t in tallies),
            failures=[f for t in tallies for f in t.failures],
        )


async def ramp(
    items: Sequence[T], login: Callable[[T], Awaitable[Attempted[R]]]
) -> list[Attempted[R] | BaseException]:
    """Every item's `login`, concurrently (the pacing is in the gate `login` passes to
    `with_retries`); a login that fails is its own outcome and stops nothing else."""
    return list(await asyncio.gather(*(login(item) for item in items), return_exceptions=True))


def _describe(error: BaseException) -> str:
    if isinstance(error, GaveUp):
        return str(error)
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if isinstance(error, grpc.RpcError) and callable(code) and callable(details):
        return f"{code().name}: {details()}"
    return str(error) or type(error).__name__
