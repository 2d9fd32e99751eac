"""Status helpers shared by both kinds, on the API's status models (`api.AgentSandboxStatus`,
`api.ServedModelStatus`, `api.Condition`): the models name every field, so no handler spells one.

Conditions keep their transition time while unchanged; a status write carries exactly the fields its
writer set, so that two writers of one object (a reconcile and the autoscaling loop) leave each other's
fields alone."""

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from agentkube.contract import timestamp  # noqa: F401  (re-exported: the operator's one spelling of a time)
from agentkube.operator import api

# (type, status, reason, message): how the pure decisions state a condition; a status of None is Unknown
# (what Knative says of a Route or Revision still being set up).
ConditionUpdate = tuple[str, bool | None, str, str]


def merge_conditions(old: Sequence[api.Condition], new: Iterable[ConditionUpdate], now: datetime) -> list[api.Condition]:
    """Kubernetes-style conditions: `lastTransitionTime` moves only when a condition's status changes."""
    previous = {c.type: c for c in old}
    merged = []
    for type_, status, reason, message in new:
        value: Literal["True", "False", "Unknown"] = "Unknown" if status is None else "True" if status else "False"
        before = previous.get(type_)
        since = before.last_transition_time if before is not None and before.status == value else now
        merged.append(api.Condition(type=type_, status=value, reason=reason, message=message, last_transition_time=since))
    return merged


def merge_own_conditions(old: Sequence[api.Condition], new: Iterable[ConditionUpdate], now: datetime,
                         keep: set[str]) -> list[api.Condition]:
    """`new` merged into `old`, keeping the old conditions of the types in `keep` (another writer's), in
    their old order: two writers that reordered the list would each see a change to write back."""
    merged = {c.type: c for c in merge_conditions(old, new, now)}
    ordered = [merged.pop(c.type) if c.type in merged else c for c in old if c.type in merged or c.type in keep]
    return ordered + list(merged.values())


def changed(old: BaseModel, new: BaseModel) -> bool:
    """Whether writing `new` would change `old`: only the fields `new` was given count. Values are
    compared as values (a time, not its spelling), so a status read back never looks changed."""
    return any(getattr(old, field) != getattr(new, field) for field in new.model_fields_set)


def status_patch(new: BaseModel) -> dict[str, Any]:
    """The merge-patch body of the fields `new` was given, in the API's spelling; a field set to None
    is removed."""
    return {"status": new.model_dump(mode="json", by_alias=True, include=new.model_fields_set)}


def parse_timestamp(value: str | None) -> datetime | None:
    """An RFC 3339 time as Kubernetes writes it; None when absent or malformed."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
