"""The gateway's watch of AgentSandboxes, without a cluster: events applied to the store, what is kept of
each object, when the cache may be used at all, and when one of its entries names a runtime to call (else
the gateway reads the sandbox and its pod as before)."""

import pytest

from agentkube import gateway
from agentkube.sandboxwatch import SandboxWatch, apply_event, is_current, slim

RUNTIME = {"podIP": "10.88.0.7", "name": "box"}
SANDBOX = {"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox",
           "metadata": {"name": "box", "namespace": "team", "uid": "u-1", "resourceVersion": "7",
                        "annotations": {"big": "x" * 1000}, "managedFields": [{"manager": "kubectl"}]},
           "spec": {"template": {"image": "sandbox", "env": [{"name": "SECRET", "value": "s"}]},
                    "lifecycle": {"suspend": False}},
           "status": {"phase": "Running", "podName": "box", "runtime": RUNTIME, "conditions": [{"type": "Ready"}]}}


def _sandbox(version="7", **status):
    return {**SANDBOX, "metadata": {**SANDBOX["metadata"], "resourceVersion": version},
            "status": {**SANDBOX["status"], **status}}


def test_events_add_change_and_remove_sandboxes_and_move_the_version():
    store: dict = {}
    assert apply_event(store, {"type": "ADDED", "object": _sandbox("9")}) == "9"
    assert store[("team", "box")]["status"]["runtime"]["podIP"] == "10.88.0.7"
    apply_event(store, {"type": "MODIFIED", "object": _sandbox("10", runtime={"podIP": "10.88.0.8", "name": "box"})})
    assert store[("team", "box")]["status"]["runtime"]["podIP"] == "10.88.0.8"
    assert apply_event(store, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12"}}}) == "12"
    assert ("team", "box") in store  # a bookmark changes no object
    apply_event(store, {"type": "DELETED", "object": _sandbox("13")})
    assert store == {}


def test_only_what_the_gateways_decisions_read_is_kept():
    kept = slim(SANDBOX)
    assert "managedFields" not in str(kept) and "x" * 1000 not in str(kept) and "template" not in str(kept)
    assert "SECRET" not in str(kept)  # nothing of the template (its env) is kept
    assert kept["status"] == {"phase": "Running", "podName": "box", "runtime": RUNTIME}
    pooled = slim({**SANDBOX, "spec": {"pool": "py", "env": [{"name": "TASK", "value": "42"}]}})
    assert pooled["spec"] == {"pool": "py", "env": [{"name": "TASK", "value": "42"}]}  # given to each call
    for full in (SANDBOX, {**SANDBOX, "spec": {"lifecycle": {"suspend": True}}}, _sandbox(phase="Suspended")):
        assert gateway.resume_patch(full, "now") == gateway.resume_patch(slim(full), "now")


def test_the_cache_is_used_only_after_its_first_list_and_while_its_watch_is_open_within_its_time():
    assert not is_current(False, 100.0, 50.0)  # no list yet
    assert not is_current(True, None, 50.0)  # the watch broke
    assert is_current(True, 100.0, 100.0)
    assert not is_current(True, 100.0, 100.1)  # silent past its timeout: broken, however quiet it looks


def test_an_entry_a_call_found_wrong_is_not_used_until_a_newer_version_comes():
    now = [0.0]
    watch = SandboxWatch(lambda **_: None, clock=lambda: now[0])
    apply_event(watch._store, {"type": "ADDED", "object": _sandbox("7")})
    assert watch.get("team", "box") is None  # not listed yet
    watch._listed, watch._ends_by = True, 65.0
    assert watch.get("team", "box")["metadata"]["resourceVersion"] == "7"
    watch.distrust("team", "box", "7")
    assert watch.get("team", "box") is None
    apply_event(watch._store, {"type": "MODIFIED", "object": _sandbox("8")})
    assert watch.get("team", "box")["metadata"]["resourceVersion"] == "8"
    now[0] = 66.0
    assert watch.get("team", "box") is None  # the watch overran its time


POOLED = slim({**SANDBOX, "spec": {"pool": "py"},
               "status": {"phase": "Running", "podName": "py-warm-b2c4d",
                          "runtime": {"podIP": "10.88.0.9", "name": "py-warm-b2c4d", "identity": "r4nd0m"}}})


@pytest.mark.parametrize("sandbox,expected", [
    (slim(SANDBOX), ("10.88.0.7", "box", "u-1")),
    (POOLED, ("10.88.0.9", "py-warm-b2c4d", "r4nd0m")),  # an adopted warm pod: its own name and identity
    (None, None),  # not in the cache (yet): read from the API server
    (slim(_sandbox(phase="Pending")), None),  # not running as far as the cache knows: ask
    (slim(_sandbox(runtime=None)), None),  # an operator that does not report the runtime: ask
    (slim({**SANDBOX, "spec": {"lifecycle": {"suspend": True}}}), None),  # the resume goes through the API server
    (slim(_sandbox(phase="Suspended")), None),
    (slim({**SANDBOX, "metadata": {**SANDBOX["metadata"], "deletionTimestamp": "2026-12-01T00:00:00Z"}}), None),
    (slim({**SANDBOX, "status": {**SANDBOX["status"], "phase": "Expired"}}), None),
])
def test_a_cached_sandbox_names_a_runtime_only_while_it_runs_and_needs_no_resume(sandbox, expected):
    assert gateway.cached_target(sandbox) == expected


def test_a_sandbox_of_its_own_never_takes_its_tokens_identity_from_the_status():
    planted = slim(_sandbox(runtime={"podIP": "10.88.0.7", "name": "other", "identity": "planted"}))
    assert gateway.cached_target(planted) == ("10.88.0.7", "box", "u-1")
