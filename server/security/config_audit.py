"""Configuration changes in the audit log: settings change by restarting the server with other
values, so each start compares its configuration with the last one recorded."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

from server.audit_actions import AuditAction
from server.records import AuditEvent


def record_configuration(log: ConfigurationLog, configuration_json: str, now: datetime) -> bool:
    """Audits the configuration the server starts with when it differs from the last one
    recorded (settings change by restarting with other values). Returns whether it changed.
    The record names the settings that changed, and their old and new values."""
    current = json.loads(configuration_json)
    previous_event = log.latest_audit_event(AuditAction.CONFIGURATION)
    previous = previous_event.details.get("configuration") if previous_event else None
    if previous == current:
        return False
    changed = sorted(_changed_paths(previous or {}, current)) if previous is not None else []
    log.append_audit(
        AuditEvent(
            AuditAction.CONFIGURATION,
            "",
            "changed" if previous is not None else "initial",
            now,
            {"configuration": current, "changed": changed},
        )
    )
    return True


class ConfigurationLog(Protocol):
    def latest_audit_event(self, action: AuditAction) -> AuditEvent | None: ...

    def append_audit(self, event: AuditEvent) -> None: ...


def _changed_paths(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            paths += _changed_paths(a, b, f"{prefix}{key}.")
        elif a != b:
            paths.append(f"{prefix}{key}")
    return paths
