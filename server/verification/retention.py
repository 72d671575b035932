"""Retention of voiceprints: a voiceprint that no check has scored against for the configured
time (RetentionPolicy, default 3 years) is erased. The agent stays; it can enroll again.

The store keeps each voiceprint's time of last use (set at enrollment, moved on by
verifications, login checks and checkpoints). The server runs `expire_unused_voiceprints` at
startup and once a day.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from server.audit_actions import AuditAction
from server.config import RetentionPolicy
from server.runtime.log_format import logged_agent
from server.storage.interface import AuditEvent, VoiceprintStore

log = logging.getLogger(__name__)


def expire_unused_voiceprints(
    store: VoiceprintStore, policy: RetentionPolicy, now: datetime
) -> list[str]:
    """Erases the voiceprints unused for longer than the policy allows, audits each erasure as
    "voiceprint.expire" in the same unit of work, and returns the ids of the agents whose
    voiceprint was erased. Blocking (a store transaction): call from a worker thread."""
    ttl = timedelta(days=policy.voiceprint_ttl_days)
    with store.unit_of_work("expire unused voiceprints") as unit:
        expired = unit.expire_voiceprints(unused_before=now - ttl)
        for agent_id in expired:
            unit.append_audit(
                AuditEvent(
                    AuditAction.VOICEPRINT_EXPIRE,
                    agent_id,
                    "ok",
                    now,
                    {"unused_for_more_than_days": policy.voiceprint_ttl_days},
                )
            )
    for agent_id in expired:
        log.info(
            "voiceprint of agent %s expired: unused for more than %g days",
            logged_agent(agent_id),
            policy.voiceprint_ttl_days,
        )
    return expired
