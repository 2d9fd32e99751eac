"""Warm pools: what a warm pod is, what a pool keeps, makes and deletes, which pod a sandbox adopts and how."""

import pytest
from pydantic import ValidationError

from agentkube.contract import (
    CLAIMED_BY_LABEL,
    POOL_LABEL,
    POOL_TEMPLATE_LABEL,
    RUNTIME_IDENTITY_ANNOTATION,
    RUNTIME_VERIFIER_ENV,
    SANDBOX_LABEL,
    runtime_token,
    token_verifier,
)
from agentkube.ebpf.csi import PodRef, admit_pod
from agentkube.ebpf.kubernetes import report_target
from agentkube.operator import api, crds, pool, pool_handlers, sandbox

KEY = b"k" * 32
POOL = {"apiVersion": api.API_VERSION, "kind": "AgentSandboxPool", "metadata": {"name": "py", "namespace": "team", "uid": "p-1"}}
SANDBOX = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox",
           "metadata": {"name": "box", "namespace": "team", "uid": "s-1"}, "spec": {"pool": "py"}}


def _template(image: str = "sandbox:1", env: list | None = None) -> api.PoolTemplate:
    return api.PoolTemplate.model_validate({"template": {"image": image, "env": env,
                                                         "resources": {"limits": {"memory": "1Gi"}}}})


def _warm(name: str, template_hash: str = "h1", ready: bool = True, phase: str = "Running", terminating: bool = False,
          created: str = "2026-11-30T10:00:00Z") -> pool.WarmPod:
    return pool.WarmPod(name, template_hash, ready and phase == "Running", phase in ("Failed", "Succeeded"), terminating, created)


def test_a_warm_pod_is_a_hardened_sandbox_pod_known_by_its_own_name_and_owned_by_its_pool():
    template = _template(env=[{"name": "A", "value": "1"}])
    pod = pool.warm_pod_manifest(POOL, template, "py-warm-b2c4d", KEY, identity="nonce")
    metadata, container = pod["metadata"], pod["spec"]["containers"][0]
    assert metadata["name"] == "py-warm-b2c4d"
    assert metadata["labels"][SANDBOX_LABEL] == "py-warm-b2c4d"  # what its runtime and the node agent know it by
    assert metadata["labels"][POOL_LABEL] == "py" and metadata["labels"][POOL_TEMPLATE_LABEL] == pool.template_hash(template)
    assert CLAIMED_BY_LABEL not in metadata["labels"]
    assert metadata["ownerReferences"] == [sandbox.owner_reference(POOL)]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["AGENTKUBE_SANDBOX_NAME"] == "py-warm-b2c4d" and env["A"] == "1"
    # Its runtime accepts the token of its own name and random identity, which the gateway reads off the pod.
    assert metadata["annotations"][RUNTIME_IDENTITY_ANNOTATION] == "nonce"
    assert env[RUNTIME_VERIFIER_ENV] == token_verifier(runtime_token(KEY, "team", "py-warm-b2c4d", "nonce"))
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "emptyDir" in pod["spec"]["volumes"][0]


def test_two_warm_pods_never_share_a_name_or_a_token():
    one, two = (pool.warm_pod_manifest(POOL, _template(), pool.warm_pod_name("py"), KEY) for _ in range(2))
    assert one["metadata"]["name"] != two["metadata"]["name"]
    assert one["metadata"]["annotations"][RUNTIME_IDENTITY_ANNOTATION] != two["metadata"]["annotations"][RUNTIME_IDENTITY_ANNOTATION]
    assert len(pool.warm_pod_name("p" * 80)) <= 63


def test_the_template_hash_follows_the_template_only():
    assert pool.template_hash(_template()) == pool.template_hash(_template())
    assert pool.template_hash(_template()) != pool.template_hash(_template("sandbox:2"))


def test_a_pool_fills_up_and_replaces_pods_that_ended():
    assert pool.plan(3, "h1", []) == pool.PoolPlan(create=3, delete=(), replicas=0, ready=0)
    decision = pool.plan(3, "h1", [_warm("a"), _warm("b", ready=False), _warm("c", phase="Failed")])
    assert decision.create == 1 and decision.delete == ("c",) and decision.replicas == 2 and decision.ready == 1


def test_pods_being_deleted_count_for_nothing_and_are_not_deleted_again():
    decision = pool.plan(1, "h1", [_warm("a", terminating=True)])
    assert decision.create == 1 and decision.delete == ()


def test_a_template_change_replaces_every_warm_pod_of_the_old_template():
    decision = pool.plan(2, "h2", [_warm("a", "h1"), _warm("b", "h1"), _warm("c", "h2")])
    assert set(decision.delete) == {"a", "b"} and decision.create == 1 and decision.ready == 1


def test_a_scale_down_removes_pods_not_ready_first_then_the_newest():
    pods = [_warm("old", created="2026-11-30T10:00:00Z"), _warm("new", created="2026-11-30T11:00:00Z"),
            _warm("starting", ready=False, created="2026-11-30T09:00:00Z")]
    assert pool.plan(1, "h1", pods).delete == ("new", "starting")
    assert pool.plan(0, "h1", pods).create == 0 and len(pool.plan(0, "h1", pods).delete) == 3


def _pod(name: str, ready: bool = True, template_hash: str = "h1", created: str = "2026-11-30T10:00:00Z", **labels) -> dict:
    return {"metadata": {"name": name, "uid": f"u-{name}", "resourceVersion": "7", "creationTimestamp": created,
                         "labels": {POOL_LABEL: "py", POOL_TEMPLATE_LABEL: template_hash, **labels},
                         "ownerReferences": [sandbox.owner_reference(POOL)]},
            "spec": {"nodeName": "n"},
            "status": {"phase": "Running" if ready else "Pending",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"},
                                      {"type": "PodScheduled", "status": "True"}]}}


def test_a_sandbox_adopts_only_ready_unclaimed_pods_of_the_current_template_oldest_first():
    pods = [_pod("young", created="2026-11-30T11:00:00Z"), _pod("old"), _pod("starting", ready=False),
            _pod("stale", template_hash="h0"), _pod("taken", **{CLAIMED_BY_LABEL: "other"})]
    assert [p["metadata"]["name"] for p in pool.adoptable(pods, "h1")] == ["old", "young"]


def test_a_claim_that_falls_back_to_a_cold_start_says_why_no_warm_pod_was_adopted():
    pods = [_pod("starting", ready=False), _pod("stale", template_hash="h0"), _pod("taken", **{CLAIMED_BY_LABEL: "x"}),
            _pod("raced")]
    assert pool.why_none_adoptable(pods, "h1") == (
        "starting: not ready, stale: old template, taken: claimed, raced: ready but taken meanwhile")
    assert pool.why_none_adoptable([], "h1") == "the pool has no pods"


def test_adoption_makes_the_sandbox_the_only_controller_conditionally_on_the_pod_it_read():
    pod = _pod("old")
    patch = pool.adoption_patch(pod, SANDBOX)["metadata"]
    assert patch["resourceVersion"] == "7"  # another sandbox that adopted it first makes this a 409
    assert patch["labels"] == {CLAIMED_BY_LABEL: "box"}
    assert patch["ownerReferences"] == [sandbox.owner_reference(SANDBOX)]  # the pool's is gone: merge patch replaces
    # The operator's one ownership check (sandbox.is_owned_by) then sees the sandbox's pod, no longer the pool's.
    assert sandbox.is_owned_by(pod, POOL) and not sandbox.is_owned_by(pod, SANDBOX)
    adopted = {**pod, "metadata": {**pod["metadata"], "ownerReferences": patch["ownerReferences"]}}
    assert sandbox.is_owned_by(adopted, SANDBOX) and not sandbox.is_owned_by(adopted, POOL)
    assert pool.runtime_name(adopted) == "old"


def test_a_pooled_sandbox_runs_its_pools_template_with_its_own_lifecycle_and_env_after_the_pools():
    template = _template(env=[{"name": "A", "value": "pool"}])
    spec = pool.sandbox_spec(template, api.Lifecycle(suspend=True), [api.EnvVar(name="A", value="mine")])
    assert spec.template is not None and spec.template.image == "sandbox:1"
    assert [(e.name, e.value) for e in spec.template.env or ()] == [("A", "pool"), ("A", "mine")]  # the last wins
    assert spec.lifecycle.suspend and spec.workspace is None
    assert template.template.env and len(template.template.env) == 1  # the pool's template is left alone


def test_a_pooled_sandboxs_service_and_policy_select_the_pod_it_claimed():
    assert sandbox.service_manifest(SANDBOX)["spec"]["selector"] == {CLAIMED_BY_LABEL: "box"}
    policy = sandbox.network_policy_manifest(SANDBOX, pool.sandbox_spec(_template()))
    assert policy["spec"]["podSelector"] == {"matchLabels": {CLAIMED_BY_LABEL: "box"}}
    plain = {**SANDBOX, "spec": {"template": {"image": "x"}}}
    assert sandbox.service_manifest(plain)["spec"]["selector"] == {SANDBOX_LABEL: "box"}


def test_warm_pods_reach_nothing_and_only_the_gateway_reaches_them_as_it_will_once_adopted():
    policy = pool.pool_network_policy_manifest(POOL, "gw")["spec"]
    assert policy["egress"] == [] and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    # The same ingress as the adopter's policy: no moment after adoption where the enforcer, still applying
    # this policy, refuses the gateway.
    adopter = sandbox.network_policy_manifest(SANDBOX, pool.sandbox_spec(_template()), "gw")["spec"]
    assert policy["ingress"] == adopter["ingress"] == [sandbox.gateway_ingress("gw")]
    # Adopted pods stay selected: until their sandbox's own policy is written they are held to this one, never
    # to none; afterwards it adds nothing to theirs (no egress, the same ingress).
    assert policy["podSelector"] == {"matchLabels": {POOL_LABEL: "py"}}


def test_a_sandbox_names_either_a_template_or_a_pool_and_the_crd_says_so():
    api.AgentSandboxSpec.model_validate({"pool": "py", "env": [{"name": "A", "value": "1"}]})
    with pytest.raises(ValidationError):
        api.AgentSandboxSpec.model_validate({"pool": "Not A Name"})
    rules = [v["rule"] for v in crds.custom_resource_definition(crds.AGENT_SANDBOX)["spec"]["versions"][0]["schema"]
             ["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"]]
    assert "has(self.template) != has(self.pool)" in rules
    assert all(r.startswith("!has(self.template) || ") for r in rules if "self.template.resources" in r)


def test_the_pool_crd_has_a_scale_subresource():
    version = crds.custom_resource_definition(crds.AGENT_SANDBOX_POOL)["spec"]["versions"][0]
    assert version["subresources"]["scale"] == {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                                                "labelSelectorPath": ".status.selector"}
    assert "scale" not in crds.custom_resource_definition(crds.AGENT_SANDBOX)["spec"]["versions"][0]["subresources"]


def test_the_node_agents_socket_reaches_warm_pods_and_reports_go_to_the_adopter():
    pod = pool.warm_pod_manifest(POOL, _template(), "py-warm-b2c4d", KEY)
    pod["metadata"]["uid"], pod["spec"]["nodeName"] = "pod-uid", "node-a"
    admit_pod(pod, PodRef("team", "py-warm-b2c4d", "pod-uid"), "node-a")
    labels = pod["metadata"]["labels"]
    assert report_target(labels, "py-warm-b2c4d") is None  # nobody to tell while it waits
    assert report_target({**labels, CLAIMED_BY_LABEL: "box"}, "py-warm-b2c4d") == "box"
    assert report_target({SANDBOX_LABEL: "plain"}, "plain") == "plain"


def test_the_operator_knows_the_waiting_warm_pods_from_their_events_until_one_is_taken():
    known = pool_handlers.Known()
    one, two = (dict(_pod(name), metadata={**_pod(name)["metadata"], "namespace": "team"}) for name in ("one", "two"))
    for pod in (one, two):
        known.saw_warm_pod("ADDED", pod)
    assert {p["metadata"]["name"] for p in known.warm_pods("team", "py")} == {"one", "two"}
    claimed = {**one, "metadata": {**one["metadata"], "labels": {**one["metadata"]["labels"], CLAIMED_BY_LABEL: "box"}}}
    known.saw_warm_pod("MODIFIED", claimed)  # adopted: no longer waiting
    known.saw_warm_pod("DELETED", two)
    assert known.warm_pods("team", "py") == []
    known.saw_warm_pod("ADDED", two)
    known.taken("team", "py", "two")  # being adopted: not offered to the next claim
    assert known.warm_pods("team", "py") == []
    known.saw_warm_pod("ADDED", {"metadata": {"name": "plain", "namespace": "team", "labels": {SANDBOX_LABEL: "plain"}}})
    assert known.warm_pods("team", "plain") == []  # a pod of no pool is none of its business


def test_the_operator_keeps_the_pool_it_saw_and_forgets_a_deleted_one():
    known = pool_handlers.Known()
    body = {**POOL, "spec": {"replicas": 1}}
    known.saw_pool("team", "py", body)
    assert known.pool("team", "py") is body  # no read
    known.saw_warm_pod("ADDED", dict(_pod("one"), metadata={**_pod("one")["metadata"], "namespace": "team"}))
    known.saw_pool("team", "py", {**body, "metadata": {**body["metadata"], "deletionTimestamp": "2026-11-30T12:00:00Z"}})
    assert known.warm_pods("team", "py") == [] and ("team", "py") not in known._pools


def test_the_operator_remembers_the_sandboxes_it_gave_a_pod_until_their_status_says_so():
    known = pool_handlers.Known()
    assert not known.may_have_given_pod("u1")
    known.giving_pod("u1")
    assert known.may_have_given_pod("u1") and not known.may_have_given_pod("u2")
