"""Status helpers shared by both kinds: conditions that keep their transition time while unchanged."""

from datetime import datetime
from typing import Any

from agentkube.contract import timestamp

__all__ = ["merge_conditions", "timestamp"]


def merge_conditions(
    old: list[dict[str, Any]], new: list[tuple[str, bool, str, str]], now: datetime
) -> list[dict[str, Any]]:
    """Kubernetes-style conditions: `lastTransitionTime` moves only when a condition's status changes."""
    previous = {c["type"]: c for c in old or []}
    merged = []
    for type_, status, reason, message in new:
        value = "True" if status else "False"
        before = previous.get(type_)
        changed = before is None or before.get("status") != value
        merged.append(
            {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": message,
                "lastTransitionTime": timestamp(now) if changed else before["lastTransitionTime"],
            }
        )
    return merged


