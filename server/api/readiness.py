"""What the servicers serve: the domain services, once the speaker model is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from enrollment.listing import AgentDirectory
from enrollment.service import EnrollmentService
from enrollment.watchlist import WatchlistService
from server.errors import ServiceNotReadyError
from server.runtime.requests import RequestLedger
from server.security.assurance_desk import AssuranceDesk
from server.shifts.service import ShiftService
from server.storage.interface import Store
from server.verification.service import VerificationService
from server.verification.throttling import VerificationThrottle


@dataclass(frozen=True)
class Services:
    enrollment: EnrollmentService
    verification: VerificationService
    shifts: ShiftService
    assurances: AssuranceDesk
    throttle: VerificationThrottle
    store: Store
    requests: RequestLedger
    agents: AgentDirectory
    watchlist: WatchlistService | None = None
    """The watchlist's administration; None where the server runs without it."""


class Readiness:
    """Holds the domain services once the model is loaded; empty while starting or stopping.

    The one source of readiness: the gRPC health service and the HTTP side's /readyz both
    say "ready" exactly while `is_ready()`, so a balancer sees the same on either."""

    def __init__(self) -> None:
        self._services: Services | None = None
        self._draining = False

    def serve(self, services: Services) -> None:
        self._services = services
        self._draining = False

    def drain(self) -> None:
        """Not ready from now on, while the calls in progress still reach the services."""
        self._draining = True

    def withdraw(self) -> None:
        self._services = None

    def is_ready(self) -> bool:
        """Whether new calls should come here: loaded, and not stopping."""
        return self._services is not None and not self._draining

    def current(self) -> Services | None:
        """The services, or None while starting or stopping."""
        return self._services

    def require(self) -> Services:
        if self._services is None:
            raise ServiceNotReadyError("the server is starting or stopping; retry shortly")
        return self._services
