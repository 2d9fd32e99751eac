"""Spot interruptions as pure functions (agentkube.operator.interruptions): the signals, the floor raised
by the pods on the node and put back once it is gone, the budget that holds the drain, and the notice."""

import pytest

from agentkube.operator import interruptions


def node(taints=(), conditions=(), deleted=False) -> dict:
    metadata = {"name": "n1", **({"deletionTimestamp": "2026-11-30T00:00:00Z"} if deleted else {})}
    return {"metadata": metadata, "spec": {"taints": list(taints)}, "status": {"conditions": list(conditions)}}


@pytest.mark.parametrize(("given", "signal"), [
    (node(), None),
    (node(taints=[{"key": "karpenter.sh/unregistered", "effect": "NoExecute"}]), None),
    (node(taints=[{"key": "karpenter.sh/disrupted", "effect": "NoSchedule"}]), "taint karpenter.sh/disrupted"),
    (node(taints=[{"key": "aws-node-termination-handler/spot-itn", "effect": "NoSchedule"}]),
     "taint aws-node-termination-handler/spot-itn"),
    (node(conditions=[{"type": "TerminationScheduled", "status": "True"}]), "condition TerminationScheduled"),
    (node(conditions=[{"type": "TerminationScheduled", "status": "False"}]), None),
    (node(deleted=True), "node deleted"),
])
def test_interruption_signals(given, signal):
    assert interruptions.interruption_signal(given) == signal


def pa(**annotations) -> dict:
    return {"metadata": {"name": "rev-1", "namespace": "ns", "annotations": annotations}}


def test_the_floor_rises_by_the_pods_on_the_node_once_per_node_and_returns_when_all_are_gone():
    patch = interruptions.raised_floor(pa(**{interruptions.MIN_SCALE: "2"}), "n1", revision_pods=4, on_node=2)
    annotations = patch["metadata"]["annotations"]
    assert annotations[interruptions.MIN_SCALE] == "6"  # on top of the 4 running
    assert annotations[interruptions.FLOOR_BEFORE] == "2"
    raised = pa(**annotations)
    assert interruptions.raised_floor(raised, "n1", revision_pods=6, on_node=2) is None  # handled already
    second = interruptions.raised_floor(raised, "n2", revision_pods=6, on_node=1)["metadata"]["annotations"]
    assert second[interruptions.MIN_SCALE] == "7" and second[interruptions.FLOOR_BEFORE] == "2"
    assert second[interruptions.INTERRUPTED_NODES] == "n1,n2"
    both = pa(**second)
    assert interruptions.restored_floor(both, existing_nodes={"n2", "other"}) is None  # n2 still there
    restored = interruptions.restored_floor(both, existing_nodes={"other"})["metadata"]["annotations"]
    assert restored == {interruptions.MIN_SCALE: "2", interruptions.FLOOR_BEFORE: None, interruptions.INTERRUPTED_NODES: None,
                        interruptions.REPLICAS_BEFORE: None, interruptions.REPLICAS_RAISED: None}
    assert interruptions.restored_floor(pa(**{interruptions.MIN_SCALE: "2"}), set()) is None  # nothing raised


def test_a_revision_without_a_floor_gets_zero_back():
    raised = interruptions.raised_floor(pa(), "n1", revision_pods=1, on_node=1)["metadata"]["annotations"]
    assert raised[interruptions.MIN_SCALE] == "2"
    assert interruptions.restored_floor(pa(**raised), set())["metadata"]["annotations"][interruptions.MIN_SCALE] == "0"


def test_the_budget_keeps_the_pods_before_the_notice_available():
    budget = interruptions.disruption_budget("ns", "rev-1", 4)
    assert budget["spec"] == {"minAvailable": 4, "selector": {"matchLabels": {"serving.knative.dev/revision": "rev-1"}}}
    assert budget["metadata"]["namespace"] == "ns"


def test_pods_group_by_revision():
    pods = [{"metadata": {"namespace": "a", "labels": {"serving.knative.dev/revision": "r"}}},
            {"metadata": {"namespace": "a", "labels": {"serving.knative.dev/revision": "r"}}},
            {"metadata": {"namespace": "b", "labels": {"serving.knative.dev/revision": "r"}}},
            {"metadata": {"namespace": "a", "labels": {}}}]
    assert {key: len(value) for key, value in interruptions.pods_by_revision(pods).items()} == {("a", "r"): 2, ("b", "r"): 1}


def test_the_notice_is_a_no_schedule_taint_added_once_and_the_nodeclaim_is_found_by_node():
    taints = interruptions.notice_taints([{"key": "x", "effect": "NoSchedule"}])
    assert taints[-1] == {"key": interruptions.SPOT_NOTICE_TAINT, "value": "true", "effect": "NoSchedule"}
    assert interruptions.notice_taints(taints) is None
    claims = [{"metadata": {"name": "a"}, "status": {"nodeName": "n0"}}, {"metadata": {"name": "b"}, "status": {"nodeName": "n1"}}]
    assert interruptions.nodeclaim_of(claims, "n1")["metadata"]["name"] == "b"
    assert interruptions.nodeclaim_of(claims, "n9") is None


def test_a_bounded_ceiling_rises_with_the_floor_and_returns_with_it():
    raised = interruptions.raised_floor(pa(**{interruptions.MIN_SCALE: "4", interruptions.MAX_SCALE: "4"}), "n1",
                                        revision_pods=4, on_node=2)["metadata"]["annotations"]
    assert (raised[interruptions.MIN_SCALE], raised[interruptions.MAX_SCALE]) == ("6", "6")
    restored = interruptions.restored_floor(pa(**{interruptions.MIN_SCALE: "4", interruptions.MAX_SCALE: "4", **raised}), set())
    assert restored["metadata"]["annotations"][interruptions.MAX_SCALE] == "4"
    assert restored["metadata"]["annotations"][interruptions.MIN_SCALE] == "4"
    unbounded = interruptions.raised_floor(pa(**{interruptions.MAX_SCALE: "0"}), "n1", 1, 1)["metadata"]["annotations"]
    assert interruptions.MAX_SCALE not in unbounded


def test_the_deployment_goes_back_to_its_count_only_while_it_keeps_the_count_it_was_raised_to():
    first = interruptions.raised_floor(pa(**{interruptions.MIN_SCALE: "4"}), "n1", revision_pods=4, on_node=2,
                                       replicas=4)
    assert interruptions.replicas_raised_to(first) == 6
    raised = first["metadata"]["annotations"]
    assert raised[interruptions.REPLICAS_BEFORE] == "4"
    # A second node before the first is gone: the count before the first notice is kept.
    second = interruptions.raised_floor(pa(**raised), "n2", revision_pods=6, on_node=1, replicas=6)["metadata"]["annotations"]
    assert (second[interruptions.REPLICAS_BEFORE], second[interruptions.REPLICAS_RAISED]) == ("4", "7")
    both = pa(**second)
    assert interruptions.restored_replicas(both, replicas=7) == 4
    assert interruptions.restored_replicas(both, replicas=9) is None  # the KPA set its own count since
    assert interruptions.restored_replicas(both, replicas=None) is None  # the Deployment is gone
    restored = interruptions.restored_floor(both, existing_nodes=set())["metadata"]["annotations"]
    assert restored[interruptions.REPLICAS_BEFORE] is None and restored[interruptions.REPLICAS_RAISED] is None


def test_without_a_deployment_nothing_is_recorded_to_scale():
    patch = interruptions.raised_floor(pa(), "n1", revision_pods=1, on_node=1)
    assert interruptions.replicas_raised_to(patch) is None
    assert interruptions.restored_replicas(pa(**patch["metadata"]["annotations"]), replicas=2) is None
