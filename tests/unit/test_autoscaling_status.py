"""Two writers share a ServedModel's conditions: the reconcile (Knative's state) and the autoscaling loop."""

from datetime import UTC, datetime

from agentkube.operator import api
from agentkube.operator.status import merge_own_conditions

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
EARLIER = "2026-11-21T11:00:00Z"


def _condition(type_: str, status: str = "True", reason: str = "R") -> api.Condition:
    return api.Condition.model_validate({"type": type_, "status": status, "reason": reason, "message": "",
                                         "lastTransitionTime": EARLIER})


def test_each_writer_keeps_the_others_condition_in_its_place():
    old = [_condition("KnativeAvailable"), _condition("Autoscaling"), _condition("Ready", "False")]
    by_loop = merge_own_conditions(old, [("Autoscaling", False, "MetricsMissing", "why")], NOW,
                                   keep={c.type for c in old})
    assert [c.type for c in by_loop] == ["KnativeAvailable", "Autoscaling", "Ready"]
    assert by_loop[1].reason == "MetricsMissing" and by_loop[1].last_transition_time == NOW
    by_reconcile = merge_own_conditions(by_loop, [("KnativeAvailable", True, "R", ""), ("Ready", False, "R", "")], NOW,
                                        keep={"Autoscaling"})
    assert by_reconcile == by_loop  # nothing changed, nothing reordered: nothing to write back


def test_a_condition_nobody_keeps_is_dropped_and_a_new_one_appended():
    old = [_condition("Autoscaling"), _condition("KnativeAvailable")]
    merged = merge_own_conditions(old, [("KnativeAvailable", True, "R", ""), ("Ready", True, "R", "")], NOW, keep=set())
    assert [c.type for c in merged] == ["KnativeAvailable", "Ready"]
    assert merged[0] == old[1]  # unchanged status keeps its transition time
