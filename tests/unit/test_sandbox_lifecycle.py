"""The lifecycle decision: run, replace, suspend on request or when idle, expire."""

import json
from datetime import UTC, datetime, timedelta

from agentkube.operator import api
from agentkube.operator.sandbox import (
    LAST_ACTIVITY_ANNOTATION,
    NAME_TAKEN_RECHECK,
    TOOL_CALLS_ANNOTATION,
    TOOLS_REFUSED_ANNOTATION,
    PodView,
    PodViews,
    conditions,
    is_owned_by,
    plan,
    status_is_current,
)
from agentkube.operator.status import merge_conditions

T0 = datetime(2026, 1, 1, tzinfo=UTC)
RUNNING = PodView(phase="Running", ready=True, scheduled=True, node_name="n1", terminating=False)


def _spec(**lifecycle) -> api.AgentSandboxSpec:
    return api.AgentSandboxSpec.model_validate({"template": {"image": "x"}, "lifecycle": lifecycle})


def test_a_new_sandbox_wants_its_pod():
    decision = plan(_spec(), T0, None, None, T0)
    assert decision.want_pod and decision.phase == "Pending" and not decision.delete_pod


def test_a_ready_pod_means_running():
    assert plan(_spec(), T0, None, RUNNING, T0).phase == "Running"


def test_a_pod_name_taken_by_someone_else_is_waited_out_never_used_or_deleted():
    for spec in (_spec(), _spec(suspend=True), _spec(expireAfter="1s", shutdownPolicy="Delete")):
        decision = plan(spec, T0, None, None, T0 + timedelta(seconds=5), pod_name_taken=True)
        assert not decision.want_pod and not decision.delete_pod
    waiting = plan(_spec(), T0, None, None, T0, pod_name_taken=True)
    assert (waiting.phase, waiting.reason, waiting.warning) == ("Pending", "PodNameTaken", True)
    assert waiting.recheck_after == NAME_TAKEN_RECHECK


def test_only_a_pod_with_the_sandboxs_uid_as_owner_is_its_own():
    body = {"metadata": {"uid": "u1"}}
    assert is_owned_by({"metadata": {"ownerReferences": [{"uid": "u1"}]}}, body)
    assert not is_owned_by({"metadata": {"ownerReferences": [{"uid": "u2"}]}}, body)
    assert not is_owned_by({"metadata": {}}, body)


def test_a_failed_pod_is_replaced():
    failed = PodView(phase="Failed", ready=False, scheduled=True, node_name="n1", terminating=False)
    decision = plan(_spec(), T0, None, failed, T0)
    assert decision.delete_pod and decision.want_pod and decision.reason == "PodReplacing"


def test_a_pod_being_deleted_is_waited_for_not_deleted_again():
    going = PodView(phase="Running", ready=True, scheduled=True, node_name="n1", terminating=True)
    decision = plan(_spec(), T0, None, going, T0)
    assert not decision.delete_pod and decision.phase == "Pending"
    suspended = plan(_spec(suspend=True), T0, None, going, T0)
    assert suspended.phase == "Suspended" and not suspended.delete_pod


def test_suspend_removes_the_pod_and_keeps_the_object():
    decision = plan(_spec(suspend=True), T0, None, RUNNING, T0)
    assert decision.phase == "Suspended" and decision.delete_pod and not decision.want_pod and not decision.delete_sandbox


def test_idle_timeout_suspends_and_activity_resumes():
    spec = _spec(idleTimeout="10m")
    active = plan(spec, T0, T0, RUNNING, T0 + timedelta(minutes=5))
    assert active.phase == "Running" and active.recheck_after == timedelta(minutes=5)
    idle = plan(spec, T0, T0, RUNNING, T0 + timedelta(minutes=10))
    assert idle.phase == "Suspended" and idle.reason == "IdleTimeout" and idle.delete_pod
    resumed = plan(spec, T0, T0 + timedelta(minutes=11), None, T0 + timedelta(minutes=11))
    assert resumed.want_pod and resumed.phase == "Pending"


def test_expiry_deletes_or_retains_as_asked():
    now = T0 + timedelta(hours=2)
    deleted = plan(_spec(expireAfter="1h", shutdownPolicy="Delete"), T0, None, RUNNING, now)
    assert deleted.delete_sandbox and deleted.phase == "Expired"
    retained = plan(_spec(expireAfter="1h"), T0, None, RUNNING, now)
    assert retained.phase == "Expired" and not retained.delete_sandbox and retained.delete_pod and not retained.want_pod
    at_time = plan(_spec(shutdownTime="2026-01-01T00:30:00Z"), T0, None, RUNNING, T0 + timedelta(minutes=10))
    assert at_time.phase == "Running" and at_time.recheck_after == timedelta(minutes=20)


def test_expiry_wins_over_suspend_and_idle():
    decision = plan(_spec(suspend=True, expireAfter="1m"), T0, None, None, T0 + timedelta(minutes=2))
    assert decision.phase == "Expired"


def test_conditions_keep_their_transition_time_while_unchanged():
    first = merge_conditions([], [("Ready", False, "PodStarting", "")], T0)
    same = merge_conditions(first, [("Ready", False, "PodScheduling", "x")], T0 + timedelta(minutes=1))
    assert same[0].last_transition_time == first[0].last_transition_time and same[0].reason == "PodScheduling"
    flipped = merge_conditions(same, [("Ready", True, "PodReady", "")], T0 + timedelta(minutes=2))
    assert flipped[0].model_dump(mode="json", by_alias=True)["lastTransitionTime"] == "2026-01-01T00:02:00Z"


def _pod(uid: str = "u1", *, phase: str = "Running", ready: bool = True, node: str | None = "n1") -> dict:
    conditions = [{"type": "PodScheduled", "status": "True" if node else "False"},
                  {"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": {"uid": uid}, "spec": {"nodeName": node}, "status": {"phase": phase, "conditions": conditions}}


def test_pod_events_that_change_nothing_reported_cost_no_reconciliation():
    views = PodViews()
    views.acted_on(_pod())
    assert not views.is_news("MODIFIED", _pod()), "a heartbeat of the same state"
    assert views.is_news("MODIFIED", _pod(ready=False))
    assert views.is_news("DELETED", _pod())
    assert views.is_news("MODIFIED", _pod()), "a deleted pod's uid is forgotten"


def test_a_just_created_pod_was_reported_by_the_reconciliation_that_made_it():
    assert not PodViews().is_news("ADDED", _pod(phase="Pending", ready=False, node=None))
    assert PodViews().is_news("ADDED", _pod()), "a pod the operator never saw, already running"


def test_a_pod_no_node_fits_is_reported_with_the_schedulers_reason():
    # A node without room: the scheduler marks the pod Unschedulable. The sandbox says why it is Pending (its
    # Ready and PodScheduled conditions), where it said only that it waited: that event is news.
    created = _pod(phase="Pending", ready=False, node=None)
    views = PodViews()
    views.acted_on(created)
    full = json.loads(json.dumps(created))
    message = "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found."
    full["status"]["conditions"][0].update(reason="Unschedulable", message=message)
    assert views.is_news("MODIFIED", full)
    view = PodView.of(full)
    decision = plan(_spec(), T0, None, view, T0)
    assert (decision.phase, decision.reason, decision.want_pod) == ("Pending", "Unschedulable", True)
    assert "Insufficient cpu" in decision.message
    scheduled = {c[0]: c for c in conditions(decision, view)}["PodScheduled"]
    assert scheduled == ("PodScheduled", False, "Unschedulable", message)
    # Merely not scheduled yet: waiting, nothing to report.
    waiting = PodView.of(created)
    assert plan(_spec(), T0, None, waiting, T0).reason == "PodScheduling"
    assert {c[0]: c for c in conditions(plan(_spec(), T0, None, waiting, T0), waiting)}["PodScheduled"][2:] == ("NotScheduled", "")


def test_an_api_server_outage_never_hides_the_pod_ready_again():
    """As seen on the real node: the pod went not ready while the API server was away; Kopf reported that
    in its re-listing (event type None) or the sandbox's own handler read it; the pod's Ready again must
    then be news, although the last *event* the handler saw before the outage said Ready too."""
    for seen_not_ready in ("listing", "another reconciliation"):
        views = PodViews()
        views.acted_on(_pod())
        if seen_not_ready == "listing":
            assert views.is_news(None, _pod(ready=False))
            views.acted_on(_pod(ready=False))  # what the reconciliation it started read
        else:
            views.acted_on(_pod(ready=False))
        assert views.is_news("MODIFIED", _pod()), seen_not_ready


def _reconciled(annotations: dict[str, str], generation: int = 2) -> dict:
    """A sandbox whose status is what a full reconciliation of it writes, read back in the API's spelling."""
    from agentkube.operator.sandbox_handlers import sandbox_status
    from agentkube.operator.status import parse_timestamp, status_patch

    body = {"metadata": {"name": "s", "namespace": "ns", "generation": generation, "annotations": annotations}}
    activity = parse_timestamp(annotations.get(LAST_ACTIVITY_ANNOTATION))
    decision = plan(_spec(), T0, activity, RUNNING, T0)
    new = sandbox_status(body, decision, RUNNING, api.AgentSandboxStatus(), activity, T0, generation)
    return {**body, "status": json.loads(json.dumps(status_patch(new)["status"]))}


def test_a_status_written_by_the_reconciliation_makes_its_own_event_ask_for_nothing():
    for annotations in ({}, {LAST_ACTIVITY_ANNOTATION: "2026-01-01T00:00:05.5Z"},
                        {TOOL_CALLS_ANNOTATION: '{"calls": 3, "failed": 1}'}, {TOOLS_REFUSED_ANNOTATION: "no BPF"}):
        assert status_is_current(_reconciled(annotations)), annotations


def test_a_new_generation_or_a_new_report_by_the_gateway_or_node_agent_asks_for_a_reconciliation():
    body = _reconciled({LAST_ACTIVITY_ANNOTATION: "2026-01-01T00:00:05Z"})
    assert not status_is_current({**body, "metadata": {**body["metadata"], "generation": 3}})
    for changed in ({LAST_ACTIVITY_ANNOTATION: "2026-01-01T00:00:09Z"}, {TOOL_CALLS_ANNOTATION: '{"calls": 1}'},
                    {TOOLS_REFUSED_ANNOTATION: "no BPF"}):
        annotations = {**body["metadata"]["annotations"], **changed}
        assert not status_is_current({**body, "metadata": {**body["metadata"], "annotations": annotations}}), changed
    assert not status_is_current({"metadata": {"generation": 1}})  # never reconciled
    # A malformed report changes nothing the status would show: nothing to do for it.
    malformed = {**body["metadata"]["annotations"], TOOL_CALLS_ANNOTATION: "{not json"}
    assert status_is_current({**body, "metadata": {**body["metadata"], "annotations": malformed}})


def test_an_event_for_every_change_of_phase_but_a_new_sandboxs_first_uneventful_pending():
    from agentkube.operator.sandbox import Plan, phase_event

    creating = Plan("Pending", "PodCreating", "creating the sandbox pod", True)
    unschedulable = Plan("Pending", "Unschedulable", "0/1 nodes are available", True, warning=True)
    running = Plan("Running", "PodReady", "the sandbox is ready", True)
    assert not phase_event(None, creating)  # what its creator just asked for
    assert phase_event(None, unschedulable)  # the user has to act: a Warning from the first look
    assert phase_event(None, running) and phase_event("Pending", running)
    assert phase_event("Running", creating)  # back to Pending (its pod replaced) is news
    assert not phase_event("Running", running) and not phase_event("Pending", unschedulable)


def test_a_listing_reconciles_every_sandbox_at_the_start_and_only_stale_ones_when_kopf_lists_again():
    from agentkube.operator.sandbox import needs_reconcile

    current = _reconciled({})
    stale = {**current, "metadata": {**current["metadata"], "generation": 3}}
    assert needs_reconcile(None, False, current)  # the operator's start: arms timers, finds what changed while down
    assert not needs_reconcile(None, True, current)  # a re-listing after a dropped watch: nothing happened to it
    assert needs_reconcile(None, True, stale)  # changed while the watch was down
    assert not needs_reconcile("MODIFIED", False, current) and not needs_reconcile("MODIFIED", True, current)
    assert needs_reconcile("MODIFIED", True, stale) and needs_reconcile("ADDED", False, {"metadata": {"generation": 1}})
