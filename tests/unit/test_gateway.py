
"""The gateway's decisions and the runtime port's checks, without a cluster: who is asking, what RBAC is
asked, which pod gets a sandbox's token, and what the sandbox's pod and policy carry for the gateway."""

import asyncio
import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from agentkube import contract, gateway
from agentkube.client import (
    DEFAULT_GATEWAY_CA,
    GATEWAY_CA_KEY,
    IN_CLUSTER_GATEWAY,
    Output,
    error_of,
    gateway_ca_configmap,
    parse_event,
)
from agentkube.ebpf.models import RunRequest
from agentkube.ebpf.runtime_port import bearer_token, from_inside_the_pod
from agentkube.operator import api, sandbox
from agentkube.runtime_client import Runtime

KEY = b"k" * 32
BODY = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "box", "namespace": "team", "uid": "u-1"}}
CHART = Path(__file__).resolve().parents[2] / "charts" / "agentkube"


def _spec(**overrides) -> api.AgentSandboxSpec:
    template = {"image": "python:3.12", "resources": {"limits": {"memory": "4Gi", "cpu": 2}}}
    return api.AgentSandboxSpec.model_validate({"template": template, **overrides})


def test_a_token_is_bound_to_its_sandbox_object_and_its_verifier_forges_nothing():
    token = contract.runtime_token(KEY, "team", "box", "u-1")
    assert contract.token_matches(token, contract.token_verifier(token))
    others = {contract.runtime_token(KEY, "team", "box", "u-2"), contract.runtime_token(KEY, "team", "box2", "u-1"),
              contract.runtime_token(KEY, "team2", "box", "u-1"), contract.runtime_token(b"x" * 32, "team", "box", "u-1")}
    assert token not in others and len(others) == 4
    verifier = contract.token_verifier(token)
    assert not contract.token_matches(verifier, verifier)  # the digest itself is no token


def test_a_runtime_proves_itself_only_with_its_own_verifier_for_its_own_sandbox_and_that_nonce():
    token = contract.runtime_token(KEY, "team", "box", "u-1")
    nonce = contract.proof_nonce()
    assert contract.is_proof_nonce(nonce) and nonce != contract.proof_nonce()
    for bad in ("", "ab", nonce.upper(), nonce + "0", nonce[:-1] + "g"):
        assert not contract.is_proof_nonce(bad)
    proof = contract.runtime_proof(contract.token_verifier(token), nonce, "team", "box")
    assert contract.proof_matches(proof, token, nonce, "team", "box")
    other_token = contract.runtime_token(KEY, "team", "box", "u-2")  # the same name, another sandbox object
    wrong = [contract.runtime_proof(contract.token_verifier(other_token), nonce, "team", "box"),
             contract.runtime_proof(contract.token_verifier(token), contract.proof_nonce(), "team", "box"),  # replayed
             contract.runtime_proof(contract.token_verifier(token), nonce, "team", "box2"),
             contract.runtime_proof(contract.token_verifier(token), nonce, "team2", "box"),
             contract.runtime_proof(token, nonce, "team", "box"),  # keyed by the token: not what a runtime holds
             proof.upper(), "", None, 7]
    for answer in wrong:
        assert not contract.proof_matches(answer, token, nonce, "team", "box"), answer
    assert token not in proof and contract.token_verifier(token) not in proof


@pytest.mark.parametrize("header,token", [(None, None), ("", None), ("Bearer", None), ("Bearer  ", None),
                                          ("Basic abc", None), ("Bearer abc", "abc"), ("bearer abc ", "abc")])
def test_bearer_tokens(header, token):
    assert bearer_token(header) == token


def test_no_token_is_a_401_that_says_how_to_send_one():
    with pytest.raises(gateway.Refusal) as refused:
        gateway.token_of(None)
    assert refused.value.status == 401 and "Authorization: Bearer" in refused.value.message


def test_a_token_the_api_server_does_not_recognise_is_a_401():
    with pytest.raises(gateway.Refusal) as refused:
        gateway.caller_of({"status": {"authenticated": False, "error": "invalid bearer token"}})
    assert refused.value.status == 401 and "invalid bearer token" in refused.value.message
    with pytest.raises(gateway.Refusal):
        gateway.caller_of({"status": {}})


def test_the_caller_is_asked_about_exec_on_that_one_sandbox():
    caller = gateway.caller_of({"status": {"authenticated": True, "user": {
        "username": "system:serviceaccount:team:agent", "uid": "1", "groups": ["system:serviceaccounts"],
        "extra": {"authentication.kubernetes.io/pod-name": ["agent-0"]}}}})
    review = gateway.access_review(caller, "team", "box")
    assert review["spec"]["user"] == "system:serviceaccount:team:agent"
    assert review["spec"]["extra"] == {"authentication.kubernetes.io/pod-name": ["agent-0"]}
    assert review["spec"]["resourceAttributes"] == {"group": "agentkube.dev", "resource": "agentsandboxes",
                                                    "subresource": "exec", "verb": "create", "namespace": "team",
                                                    "name": "box"}
    gateway.check_allowed({"status": {"allowed": True}}, caller, "team", "box")
    for status in ({"allowed": False}, {"allowed": False, "denied": True}, {}):
        with pytest.raises(gateway.Refusal) as refused:
            gateway.check_allowed({"status": status}, caller, "team", "box")
        assert refused.value.status == 403 and "sandbox-user" in refused.value.message


def _pod(uid="u-1", phase="Running", ip="10.88.0.7", label="box"):
    return {"metadata": {"name": "box", "labels": {contract.SANDBOX_LABEL: label},
                         "ownerReferences": [{"uid": uid, "controller": True}]},
            "status": {"phase": phase, "podIP": ip}}


def test_only_the_sandboxes_own_running_pod_gets_its_token():
    assert gateway.runtime_address(BODY, _pod(), "team", "box") == "10.88.0.7"
    cases = [(None, _pod(), 404), (BODY, None, 409), (BODY, _pod(uid="someone-else"), 502), (BODY, _pod(label="x"), 502),
             (BODY, _pod(phase="Pending"), 503), (BODY, _pod(ip=""), 503)]
    for body, pod, status in cases:
        with pytest.raises(gateway.Refusal) as refused:
            gateway.runtime_address(body, pod, "team", "box")
        assert refused.value.status == status, (body, pod)
    assert Runtime("fd00::7", contract.RUNTIME_PORT, "team", "box", "t").host == "[fd00::7]"


def test_reviews_are_reused_briefly_and_keyed_by_digest():
    cache = gateway.ReviewCache(seconds=10, size=2)
    caller = gateway.Caller("u", "", (), ())
    cache.put(gateway.token_digest("secret-token"), caller, now=0)
    assert cache.get(gateway.token_digest("secret-token"), now=5) == caller
    assert cache.get(gateway.token_digest("secret-token"), now=11) is None
    assert "secret-token" not in json.dumps(list(cache._entries))
    cache.put("a", caller, 0)
    cache.put("b", caller, 0)
    assert len(cache._entries) <= 2


class _CountingApi:
    """The API server's answers to the gateway's reviews, counted: allowed for `allowed` callers only."""

    def __init__(self, allowed: set[str]):
        self.allowed, self.access_reviews = allowed, 0

    async def review_token(self, token: str) -> dict:
        return {"status": {"authenticated": True, "user": {"username": token}}}

    async def review_access(self, review: dict) -> dict:
        self.access_reviews += 1
        return {"status": {"allowed": review["spec"]["user"] in self.allowed}}


def test_an_allowed_call_is_reused_briefly_and_a_denial_is_asked_again_each_time():
    class Request:
        def __init__(self, token: str):
            self.headers = {"Authorization": f"Bearer {token}"}

    api = _CountingApi(allowed={"alice"})
    gate = gateway.Gateway(api, b"k" * 32)  # type: ignore[arg-type]

    async def calls() -> None:
        for _ in range(3):
            assert (await gate.authorize(Request("alice"), "team", "box")).username == "alice"
        assert api.access_reviews == 1
        await gate.authorize(Request("alice"), "team", "other")  # another sandbox: its own review
        assert api.access_reviews == 2
        for _ in range(2):
            with pytest.raises(gateway.Refusal) as refused:
                await gate.authorize(Request("mallory"), "team", "box")
            assert refused.value.status == 403
        assert api.access_reviews == 4

    asyncio.run(calls())
    gate.access._entries = {key: (0.0, allowed) for key, (_, allowed) in gate.access._entries.items()}  # expired
    asyncio.run(gate.authorize(Request("alice"), "team", "box"))
    assert api.access_reviews == 5


@pytest.mark.parametrize("peer,local,inside", [("127.0.0.1", "10.88.0.7", True), ("::1", "::", True),
                                               ("10.88.0.7", "10.88.0.7", True), ("::ffff:10.88.0.7", "10.88.0.7", True),
                                               ("10.88.0.9", "10.88.0.7", False), ("::ffff:10.88.0.9", "::ffff:10.88.0.7", False)])
def test_the_runtime_port_refuses_its_own_pod(peer, local, inside):
    assert from_inside_the_pod(peer, local) is inside


def test_the_pod_carries_a_verifier_only_with_a_key_and_the_template_cannot_set_it():
    assert contract.RUNTIME_VERIFIER_ENV not in json.dumps(sandbox.pod_manifest(BODY, _spec()))
    spec = _spec(template={"image": "x", "resources": {"limits": {"memory": "1Gi"}},
                           "env": [{"name": contract.RUNTIME_VERIFIER_ENV, "value": "mine"}]})
    env = sandbox.pod_manifest(BODY, spec, KEY)["spec"]["containers"][0]["env"]
    verifiers = [e["value"] for e in env if e["name"] == contract.RUNTIME_VERIFIER_ENV]
    assert verifiers == [contract.token_verifier(contract.runtime_token(KEY, "team", "box", "u-1"))]


def test_the_runtime_port_admits_the_gateways_pods_in_its_namespace_only():
    ingress = sandbox.network_policy_manifest(BODY, _spec(), "agentkube-system")["spec"]["ingress"]
    assert ingress == [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "agentkube-system"}},
                                  "podSelector": {"matchLabels": contract.GATEWAY_LABELS}}],
                        "ports": [{"protocol": "TCP", "port": contract.RUNTIME_PORT}]}]


def test_the_charts_gateway_pods_carry_the_labels_sandbox_policies_select():
    template = (CHART / "templates" / "gateway.yaml").read_text()
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert "app.kubernetes.io/component: gateway" in template and 'include "agentkube.labels"' in template
    assert "app.kubernetes.io/name: agentkube" in helpers
    assert contract.GATEWAY_LABELS == {"app.kubernetes.io/name": "agentkube", "app.kubernetes.io/component": "gateway"}
    rbac = (CHART / "templates" / "gateway-rbac.yaml").read_text()
    assert re.search(r"resources: \[agentsandboxes/exec\]\s+verbs: \[create\]", rbac)
    # Each file operation's verb (gateway.FILE_ACCESS) is granted to users, and nothing more on files.
    verbs = sorted({access.verb for access in gateway.FILE_ACCESS.values()})
    assert re.search(r"resources: \[agentsandboxes/files\]\s+verbs: \[(.*)\]", rbac).group(1).split(", ") == [
        "create", "get", "list", "delete"] and sorted(["create", "get", "list", "delete"]) == verbs
    assert "secrets" not in rbac
    # It watches sandboxes (their status says where a running one's runtime is) and only reads pods one by
    # one: a list or watch of pods cannot be narrowed to sandbox pods.
    assert re.search(r"resources: \[agentsandboxes\]\s+verbs: \[get, patch\]", rbac)
    assert re.search(r"if .Values.gateway.watchSandboxes }}\s+- apiGroups: \[agentkube.dev\]\s+"
                     r"resources: \[agentsandboxes\]\s+verbs: \[list, watch\]", rbac)
    assert re.search(r"resources: \[pods\]\s+verbs: \[get\]", rbac)


def test_the_sdk_reads_the_stream_and_errors():
    assert parse_event(b'{"stream": "stdout", "data": "hi\\n"}') == Output("stdout", "hi\n")
    error = error_of(403, b'{"error": "no"}')
    assert (error.status, error.message) == (403, "no")
    with pytest.raises(Exception, match="could not be finished"):
        parse_event(b'{"error": "gone"}')


def test_a_suspended_sandbox_is_resumed_through_the_operators_own_fields():
    def box(phase, suspend=False):
        return {"metadata": {"name": "box"}, "spec": {"lifecycle": {"suspend": suspend}}, "status": {"phase": phase}}

    assert gateway.resume_patch(box("Running"), "now") is None
    assert gateway.resume_patch(box("Suspended", suspend=True), "now") == {"spec": {"lifecycle": {"suspend": False}}}
    assert gateway.resume_patch(box("Running", suspend=True), "now") == {"spec": {"lifecycle": {"suspend": False}}}
    assert gateway.resume_patch(box("Suspended"), "now") == {
        "metadata": {"annotations": {contract.LAST_ACTIVITY_ANNOTATION: "now"}}}
    with pytest.raises(gateway.Refusal) as refused:
        gateway.resume_patch(box("Expired"), "now")
    assert refused.value.status == 409


@pytest.mark.parametrize("address, published", [
    ("https://agentkube-gateway.agentkube-system.svc:8080", ("agentkube-system", "agentkube-gateway-ca")),
    ("https://edge-gateway.platform.svc.cluster.local:8443", ("platform", "edge-gateway-ca")),
    ("https://127.0.0.1:8080", DEFAULT_GATEWAY_CA),  # a port-forward: the chart's default release
    ("https://gateway.example.com", DEFAULT_GATEWAY_CA),
])
def test_the_sdk_finds_the_gateways_ca_where_the_chart_publishes_it(address, published):
    assert gateway_ca_configmap(address) == published


def test_the_chart_publishes_its_ca_under_the_name_the_sdk_looks_for_and_serves_https():
    gateway_yaml = (CHART / "templates" / "gateway.yaml").read_text()
    tls_yaml = (CHART / "templates" / "gateway-tls.yaml").read_text()
    assert "name: {{ $gateway }}-ca" in tls_yaml and f"{GATEWAY_CA_KEY}: {{{{ $cert.ca | quote }}}}" in tls_yaml
    assert "--tls-cert-file=" in gateway_yaml and IN_CLUSTER_GATEWAY.startswith("https://")


def test_the_gateway_serves_tls_with_both_files_or_plain_http_with_neither(tmp_path):
    assert gateway.tls_context(None, None) is None
    with pytest.raises(SystemExit, match="both"):
        gateway.tls_context(tmp_path / "tls.crt", None)


POOLED = {"metadata": {"name": "box", "namespace": "team", "uid": "s-1"},
          "spec": {"pool": "py", "env": [{"name": "TASK", "value": "42"}, {"name": "MODE", "value": "pool"}]},
          "status": {"phase": "Running", "podName": "py-warm-b2c4d"}}


def _adopted(owner="s-1", claimed_by="box", identity="nonce"):
    return {"metadata": {"name": "py-warm-b2c4d",
                         "labels": {contract.SANDBOX_LABEL: "py-warm-b2c4d", contract.CLAIMED_BY_LABEL: claimed_by},
                         "annotations": {contract.RUNTIME_IDENTITY_ANNOTATION: identity},
                         "ownerReferences": [{"uid": owner, "controller": True}]},
            "status": {"phase": "Running", "podIP": "10.88.0.9"}}


def test_a_sandbox_from_a_pool_is_served_by_the_warm_pod_it_adopted_with_that_pods_token():
    assert gateway.pod_name(POOLED, "box") == "py-warm-b2c4d" and gateway.pod_name(BODY, "box") == "box"
    assert gateway.runtime_address(POOLED, _adopted(), "team", "box") == "10.88.0.9"
    for pod in (_adopted(owner="p-1"), _adopted(claimed_by="other")):  # still the pool's, or another sandbox's
        with pytest.raises(gateway.Refusal) as refused:
            gateway.runtime_address(POOLED, pod, "team", "box")
        assert refused.value.status == 502
    # The token is the one the warm pod's runtime was started with: its own name and random identity.
    assert gateway.runtime_identity(POOLED, _adopted()) == ("py-warm-b2c4d", "nonce")
    # A sandbox of its own never takes its token's identity from a pod annotation.
    plain_pod = _pod()
    plain_pod["metadata"]["annotations"] = {contract.RUNTIME_IDENTITY_ANNOTATION: "planted"}
    assert gateway.runtime_identity(BODY, plain_pod) == ("box", BODY["metadata"]["uid"])


def test_every_call_of_a_pooled_sandbox_carries_its_env_and_the_calls_own_variables_win():
    run = gateway.with_sandbox_env(RunRequest(argv=["env"], env={"MODE": "call"}), POOLED)
    assert run.env == {"TASK": "42", "MODE": "call"}
    assert gateway.with_sandbox_env(RunRequest(argv=["env"]), BODY).env is None
    for bad in ({"A\0": "1"}, {"A": "x\0y"}, {"": "1"}, {"1A B": "1"}):
        with pytest.raises(ValidationError):
            RunRequest(argv=["env"], env=bad)


def test_a_claim_names_its_sandbox_so_that_asking_again_finds_the_same_one():
    from agentkube.client import claim_request

    first, second = claim_request("Py.Tools", None, None, 60), claim_request("py", None, None, 60)
    assert first.name is not None and re.fullmatch(r"py-tools-[0-9a-f]{8}", first.name)
    assert second.name != claim_request("py", None, None, 60).name  # a new claim, a new name
    caller = gateway.Caller(username="system:serviceaccount:team:agent", groups=("system:authenticated",), uid="", extra=())
    manifest = gateway.claim_manifest("py", first, caller)
    assert manifest["metadata"]["name"] == first.name and "generateName" not in manifest["metadata"]
    made = {**manifest, "metadata": {**manifest["metadata"], "uid": "u-9"}}
    gateway.check_same_claim(made, "team", "py", first.name, caller)  # the same claim: its sandbox
    stranger = gateway.Caller(username="system:serviceaccount:team:other", groups=(), uid="", extra=())
    plain = {**BODY, "spec": {"pool": "py"}}
    for found, asking, pool in ((made, stranger, "py"), (made, caller, "other-pool"), (plain, caller, "py"), (None, caller, "py")):
        with pytest.raises(gateway.Refusal) as refused:
            gateway.check_same_claim(found, "team", pool, first.name, asking)
        assert refused.value.status == 409
    with pytest.raises(ValidationError):
        gateway.ClaimRequest(name="Not_A-Name")
