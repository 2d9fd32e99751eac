"""Status is written through the API's status models: what a handler writes reads back as unchanged, a
field set to None is removed, and each writer writes only its own fields."""

from datetime import UTC, datetime, timedelta

from agentkube.operator import api, sandbox
from agentkube.operator.sandbox_handlers import sandbox_status
from agentkube.operator.servedmodel_handlers import served_model_status
from agentkube.operator.status import changed, status_patch

NOW = datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
RUNNING = sandbox.PodView(phase="Running", ready=True, scheduled=True, node_name="n1", terminating=False)


def _sandbox(**annotations: str) -> dict:
    return {"metadata": {"name": "coder", "namespace": "ns", "generation": 3, "annotations": annotations}}


def _read_back(status: api.AgentSandboxStatus | api.ServedModelStatus, old: dict | None = None) -> dict:
    """The status as the API server stores it after the merge patch."""
    stored = dict(old or {})
    for key, value in status_patch(status)["status"].items():
        if value is None:
            stored.pop(key, None)
        else:
            stored[key] = value
    return stored


def test_a_sandbox_status_written_reads_back_unchanged():
    plan = sandbox.plan(api.AgentSandboxSpec.model_validate({"template": {"image": "x"}}), NOW, None, RUNNING, NOW)
    totals = '{"calls": 4, "failed": 1, "oomKilled": 1, "blockedConnections": 0, "dnsRefused": 0}'
    body = _sandbox(**{sandbox.TOOL_CALLS_ANNOTATION: totals})
    new = sandbox_status(body, plan, RUNNING, api.AgentSandboxStatus(), NOW, NOW, 3)
    stored = _read_back(new)
    assert stored["phase"] == "Running" and stored["podName"] == "coder" and stored["nodeName"] == "n1"
    assert stored["toolCalls"] == {"calls": 4, "failed": 1, "oomKilled": 1, "blockedConnections": 0, "dnsRefused": 0}
    assert stored["lastActivityTime"] == "2026-11-21T12:00:00.123456Z" and stored["observedGeneration"] == 3
    assert stored["conditions"][0]["lastTransitionTime"] == "2026-11-21T12:00:00.123456Z"
    old = api.AgentSandboxStatus.model_validate(stored)
    later = sandbox_status(body, plan, RUNNING, old, None, NOW + timedelta(minutes=1), 3)
    assert not changed(old, later)  # a reconcile with nothing new writes nothing


def test_a_suspended_sandbox_loses_its_pod_fields_and_keeps_what_the_node_agent_reported():
    running = api.AgentSandboxStatus.model_validate(
        {"phase": "Running", "podName": "coder", "nodeName": "n1", "toolCalls": {"calls": 2}, "lastActivityTime": "2026-11-21T11:00:00Z"})
    spec = api.AgentSandboxSpec.model_validate({"template": {"image": "x"}, "lifecycle": {"suspend": True}})
    plan = sandbox.plan(spec, NOW, None, RUNNING, NOW)
    new = sandbox_status(_sandbox(), plan, RUNNING, running, None, NOW, 3)
    patch = status_patch(new)["status"]
    assert patch["podName"] is None and patch["nodeName"] is None  # null in a merge patch: removed
    assert patch["toolCalls"]["calls"] == 2 and patch["lastActivityTime"] == "2026-11-21T11:00:00Z"


def _model(policy: str) -> tuple[dict, api.ServedModelSpec]:
    spec = {"model": {"name": "m"}, "image": "x", "autoscaling": {"policy": policy, "target": 50}}
    return {"metadata": {"name": "m", "namespace": "ns", "generation": 1}, "spec": spec}, api.ServedModelSpec.model_validate(spec)


READY_SERVICE = {"status": {"url": "http://m.ns", "conditions": [{"type": "Ready", "status": "True"}]}}


def test_the_reconcile_writes_the_spec_target_unless_the_autoscaling_loop_owns_it():
    body, spec = _model("kpa")
    new = served_model_status(body, spec, api.ServedModelStatus(), READY_SERVICE, NOW)
    assert status_patch(new)["status"]["concurrencyTarget"] == 50 and new.ready and new.url == "http://m.ns"
    body, spec = _model("ppo")
    loop_wrote = api.ServedModelStatus.model_validate({
        "concurrencyTarget": 80, "conditions": [{"type": "Autoscaling", "status": "True", "reason": "PolicyDecided"}],
        "lastDecision": {"time": "2026-11-21T11:59:30Z", "value": 80, "reason": "PolicyDecided"}})
    new = served_model_status(body, spec, loop_wrote, READY_SERVICE, NOW)
    patch = status_patch(new)["status"]
    assert "concurrencyTarget" not in patch and "lastDecision" not in patch  # the loop's fields, left alone
    assert [c["type"] for c in patch["conditions"]] == ["Autoscaling", "KnativeAvailable", "RouteReady", "RevisionReady", "Ready"]


def test_a_decision_without_a_policy_target_removes_the_previous_one():
    # A merge patch merges nested objects: a field the new decision lacks must be sent as null, or the
    # previous decision's value would stay beside the new one.
    decision = api.AutoscalingDecision(time=NOW, value=100, reason="MetricsMissing")
    patch = status_patch(api.ServedModelStatus(last_decision=decision, concurrency_target=100))["status"]
    assert patch["lastDecision"]["policyTarget"] is None and patch["lastDecision"]["previousValue"] is None


def test_status_takes_the_url_from_the_route_and_says_why_the_latest_revision_is_not_ready():
    body, spec = _model("kpa")
    service = {"metadata": {"name": "m"}, "status": {
        "url": "http://m.ns", "latestCreatedRevisionName": "m-00002", "latestReadyRevisionName": "m-00001",
        "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]}}
    route = {"status": {"url": "http://m.ns.svc.cluster.local", "conditions": [{"type": "Ready", "status": "True"}]}}
    revision = {"status": {"conditions": [{"type": "Ready", "status": "False", "reason": "ExitCode1",
                                           "message": "Container failed with: ValueError"}]}}
    new = served_model_status(body, spec, api.ServedModelStatus(), service, NOW, route, revision)
    assert new.url == "http://m.ns.svc.cluster.local" and not new.ready
    assert (new.latest_created_revision, new.latest_ready_revision) == ("m-00002", "m-00001")
    by_type = {c.type: c for c in new.conditions}
    assert by_type["RouteReady"].status == "True"
    assert by_type["RevisionReady"].status == "False" and by_type["RevisionReady"].reason == "ExitCode1"
    assert by_type["RevisionReady"].message == "Revision m-00002: Container failed with: ValueError"
    patch = status_patch(new)["status"]
    assert patch["latestCreatedRevision"] == "m-00002" and patch["latestReadyRevision"] == "m-00001"


def test_route_and_revision_are_unknown_until_knative_says():
    body, spec = _model("kpa")
    new = served_model_status(body, spec, api.ServedModelStatus(), {"metadata": {"name": "m"}, "status": {}}, NOW)
    by_type = {c.type: c for c in new.conditions}
    assert by_type["RouteReady"].status == by_type["RevisionReady"].status == "Unknown"
    assert by_type["RevisionReady"].message == "no Revision yet: not ready yet" and new.url is None


def test_a_running_sandbox_reports_where_its_runtime_is_and_a_suspended_one_no_longer_does():
    """status.runtime is what the gateway's watch takes a call to: the pod's address, and the name and
    identity its runtime's token is derived from (a warm pod's own, once adopted)."""
    warm = {"metadata": {"name": "py-warm-b2c4d", "labels": {sandbox.SANDBOX_LABEL: "py-warm-b2c4d"},
                         "annotations": {"agentkube.dev/runtime-identity": "r4nd0m"}},
            "status": {"podIP": "10.88.0.9"}}
    endpoint = sandbox.runtime_endpoint(warm)
    assert endpoint == api.RuntimeEndpoint(pod_ip="10.88.0.9", name="py-warm-b2c4d", identity="r4nd0m")
    assert sandbox.runtime_endpoint({"metadata": {"name": "coder", "labels": {sandbox.SANDBOX_LABEL: "coder"}},
                                     "status": {}}) is None  # no address yet
    assert sandbox.runtime_endpoint(None) is None
    running = sandbox.plan(api.AgentSandboxSpec.model_validate({"template": {"image": "x"}}), NOW, None, RUNNING, NOW)
    stored = _read_back(sandbox_status(_sandbox(), running, RUNNING, api.AgentSandboxStatus(), None, NOW, 3,
                                       "py-warm-b2c4d", endpoint))
    assert stored["runtime"] == {"podIP": "10.88.0.9", "name": "py-warm-b2c4d", "identity": "r4nd0m"}
    assert api.AgentSandboxStatus.model_validate(stored).runtime == endpoint
    suspended = sandbox.plan(api.AgentSandboxSpec.model_validate({"template": {"image": "x"}, "lifecycle": {"suspend": True}}),
                             NOW, None, RUNNING, NOW)
    patch = status_patch(sandbox_status(_sandbox(), suspended, RUNNING, api.AgentSandboxStatus.model_validate(stored),
                                        None, NOW, 3, None, endpoint))["status"]
    assert patch["runtime"] is None  # removed: the gateway's watch sends no call there any more
