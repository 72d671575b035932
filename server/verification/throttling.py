"""Throttling of verification attempts, as NIST SP 800-63B-4 asks of biometrics: after a few
consecutive failed attempts for one agent each further attempt waits, exponentially longer;
after many, the agent's biometric verification is disabled until an admin re-enables it.

Only a claimant's explicit attempts count (Verify and shift login checks); a shift's passive
checkpoints do not (they have their own lock). The count lives in the store, so a restart does
not reset it.

An admitted attempt counts as a failure from the moment it is admitted until it is decided:
two concurrent attempts therefore never both get through where only one may, and an attempt
cut short by a crash stays counted (failing closed). ACCEPT then resets the count, REJECT keeps
it, and an attempt that decided nothing (too little speech, bad audio) is taken back off the
count, though it has used up its slot in the delay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from datetime import datetime, timedelta

from server.audit_actions import AuditAction
from server.config import ThrottlePolicy
from server.errors import ThrottledError, VerificationDisabledError
from server.runtime.log_format import logged_agent
from server.storage.interface import AuditEvent, Store, ThrottleState
from server.validation import validate_agent_id
from server.verification.decision import Decision

log = logging.getLogger(__name__)

# 2**_MAX_DOUBLINGS times any sensible base delay is far beyond the cap; bounding the exponent
# keeps the arithmetic finite whatever the configured limits.
_MAX_DOUBLINGS = 64


def delay_after(failures: int, policy: ThrottlePolicy) -> timedelta:
    """How long the next attempt must wait after the latest of `failures` consecutive failures:
    nothing within the free failures, then the base delay, doubling with each further failure
    up to the cap."""
    if failures < policy.free_failures:
        return timedelta(0)
    doublings = min(failures - policy.free_failures, _MAX_DOUBLINGS)
    seconds = min(math.ldexp(policy.base_delay_seconds, doublings), policy.max_delay_seconds)
    return timedelta(seconds=seconds)


class VerificationThrottle:
    """Admits or refuses an agent's verification attempts and keeps the count. Thread-safe:
    every step is one atomic update in the store."""

    def __init__(self, store: Store, policy: ThrottlePolicy) -> None:
        self._store = store
        self._policy = policy

    def check(self, agent_id: str, now: datetime) -> None:
        """Admits one attempt, counting it as failed until `record` or `abandon` says
        otherwise. Raises ThrottledError (with the time to wait) or VerificationDisabledError,
        and AgentNotFoundError."""

        def admit(state: ThrottleState) -> ThrottleState:
            if state.disabled_at is not None:
                raise VerificationDisabledError(
                    f"biometric verification of agent {agent_id} is disabled after "
                    f"{state.consecutive_failures} consecutive failed attempts; an "
                    "administrator must re-enable it"
                )
            delay = delay_after(state.consecutive_failures, self._policy)
            if delay and state.last_failure_at is not None:
                allowed_at = state.last_failure_at + delay
                if now < allowed_at:
                    wait = math.ceil((allowed_at - now).total_seconds())
                    raise ThrottledError(
                        f"too many failed verifications for agent {agent_id}: retry in {wait} s",
                        retry_after_seconds=wait,
                    )
            return replace(
                state, consecutive_failures=state.consecutive_failures + 1, last_failure_at=now
            )

        try:
            self._store.update_throttle_state(agent_id, admit)
        except (ThrottledError, VerificationDisabledError) as refusal:
            log.warning("verification refused: %s", refusal.message)
            raise

    def record(self, agent_id: str, decision: Decision, now: datetime) -> None:
        """Settles an admitted attempt by its decision: ACCEPT resets the count, REJECT is a
        failure (the delay runs from now), INCONCLUSIVE is neither."""
        if decision is Decision.INCONCLUSIVE:
            self.abandon(agent_id)
            return
        if decision is Decision.ACCEPT:
            # Only an administrator lifts a disable, even one that came while this attempt ran.
            self._store.update_throttle_state(
                agent_id, lambda state: state if state.disabled_at else ThrottleState()
            )
            return

        def failed(state: ThrottleState) -> ThrottleState:
            # At least this failure: an ACCEPT settled meanwhile has cleared its count.
            failures = max(state.consecutive_failures, 1)
            disable = failures >= self._policy.disable_after_failures
            return ThrottleState(
                consecutive_failures=failures,
                last_failure_at=now,
                disabled_at=state.disabled_at or (now if disable else None),
            )

        with self._store.unit_of_work(f"count a failed verification of agent {agent_id}") as unit:
            before = unit.update_throttle_state(agent_id, failed)
            after = failed(before)
            disabled = before.disabled_at is None and after.disabled_at is not None
            if disabled:
                # In the same unit: a disable is never left unaudited.
                unit.append_audit(
                    AuditEvent(
                        AuditAction.THROTTLE_DISABLE,
                        agent_id,
                        "DISABLED",
                        now,
                        {"consecutive_failures": after.consecutive_failures},
                    )
                )
        if disabled:
            log.warning(
                "biometric verification of agent %s disabled after %d consecutive failures",
                logged_agent(agent_id),
                after.consecutive_failures,
            )

    def abandon(self, agent_id: str) -> None:
        """Takes back an admitted attempt that ended without a decision (an error)."""

        def taken_back(state: ThrottleState) -> ThrottleState:
            return replace(state, consecutive_failures=max(state.consecutive_failures - 1, 0))

        self._store.update_throttle_state(agent_id, taken_back)

    def re_enable(self, agent_id: str, *, reason: str, by: str, now: datetime) -> ThrottleState:
        """For an administrator (`by`): clears the agent's count and lifts a disable, audited
        as "throttle.re_enable" with the reason, in one unit. Returns the state it had.
        Raises AgentNotFoundError."""
        agent_id = validate_agent_id(agent_id)
        with self._store.unit_of_work(f"re-enable verification of agent {agent_id}") as unit:
            previous = unit.update_throttle_state(agent_id, lambda _: ThrottleState())
            unit.append_audit(
                AuditEvent(
                    AuditAction.THROTTLE_RE_ENABLE,
                    agent_id,
                    "ok",
                    now,
                    {
                        "reason": reason,
                        "by": by,
                        "consecutive_failures": previous.consecutive_failures,
                        "was_disabled": previous.disabled_at is not None,
                    },
                )
            )
        return previous
