"""What an AgentSandbox becomes: a hardened pod named in DNS by its namespace's headless service, a claim, a network policy."""

import json

import pytest

from agentkube.operator import api, sandbox

BODY = {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "box", "namespace": "team", "uid": "u-1"}}


def _spec(**overrides) -> api.AgentSandboxSpec:
    template = {"image": "python:3.12", "resources": {"limits": {"memory": "4Gi", "cpu": 2}}}
    return api.AgentSandboxSpec.model_validate({"template": template, **overrides})


def test_pod_is_hardened_owned_and_carries_the_tool_intents():
    pod = sandbox.pod_manifest(BODY, _spec(tools={"profiles": {"test": {"memory": "2Gi"}}}))
    container = pod["spec"]["containers"][0]
    security = container["securityContext"]
    assert security["runAsNonRoot"] and not security["allowPrivilegeEscalation"] and not security["privileged"]
    assert security["capabilities"] == {"drop": ["ALL"]} and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["name"] == "box"  # one name, so never two pods
    assert pod["metadata"]["ownerReferences"] == [sandbox.owner_reference(BODY)]
    assert container["resources"]["limits"] == {"memory": "4Gi", "cpu": "2"}
    tools = json.loads(pod["metadata"]["annotations"][sandbox.TOOLS_ANNOTATION])
    assert tools["envelope"] == {"memory": "4Gi", "cpu": "2"} and tools["profiles"]["test"]["memory"] == "2Gi"


def test_the_pod_is_ready_only_once_its_runtime_accepts():
    """With a gateway the kubelet connects to the runtime's port; without one it connects to the runtime's
    unix socket from inside the container, at start only. Until then the container (so the pod, the
    sandbox) is not Ready."""
    served = sandbox.pod_manifest(BODY, _spec(), b"k" * 32)["spec"]["containers"][0]
    for probe in (served["startupProbe"], served["readinessProbe"]):
        assert probe["tcpSocket"] == {"port": sandbox.SANDBOX_RUNTIME_PORT}
    assert served["startupProbe"]["periodSeconds"] == 1  # Ready within about a second of the runtime listening
    local = sandbox.pod_manifest(BODY, _spec())["spec"]["containers"][0]
    command = local["startupProbe"]["exec"]["command"]
    assert command[:3] == ["python3", "-S", "-c"] and sandbox.RUNTIME_ENV["AGENTKUBE_SANDBOX_SOCKET"] in command[3]
    assert "readinessProbe" not in local  # no process started in the sandbox every 10 s


def test_workspace_is_a_claim_when_asked_and_an_empty_dir_otherwise():
    with_claim = sandbox.pod_manifest(BODY, _spec(workspace={"size": "5Gi"}))
    assert with_claim["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "box-workspace"
    claim = sandbox.workspace_claim_manifest(BODY, api.Workspace(size="5Gi"))
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert "emptyDir" in sandbox.pod_manifest(BODY, _spec())["spec"]["volumes"][0]


def test_one_headless_service_per_namespace_names_every_sandbox_pod():
    """The StatefulSet pattern: the namespace's shared headless Service selects every sandbox pod, and each
    pod's hostname and subdomain give it `HOST.SERVICE.NS.svc.DOMAIN`, published while it starts."""
    service = sandbox.shared_service_manifest("team")
    assert service["metadata"]["name"] == sandbox.SANDBOX_SERVICE and service["metadata"]["namespace"] == "team"
    assert "ownerReferences" not in service["metadata"]  # it serves every sandbox of the namespace
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["ports"] == [{"name": "runtime", "port": sandbox.SANDBOX_RUNTIME_PORT,
                                         "targetPort": sandbox.SANDBOX_RUNTIME_PORT}]
    pod = sandbox.pod_manifest(BODY, _spec())
    assert pod["spec"]["hostname"] == "box" and pod["spec"]["subdomain"] == sandbox.SANDBOX_SERVICE
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert sandbox.sandbox_fqdn(BODY, pod) == "box.agentkube-sandboxes.team.svc.cluster.local"
    assert sandbox.sandbox_fqdn(BODY, None) == "box.agentkube-sandboxes.team.svc.cluster.local"  # the pod to come
    assert not sandbox.has_own_service(pod) and not sandbox.has_own_service(None)


def test_a_pod_an_earlier_version_made_keeps_the_sandbox_s_own_service():
    """Before the shared Service every sandbox had a headless Service of its own name and its pod that name as
    subdomain. A pod's subdomain never changes, so while that pod lives its name is the old one."""
    legacy_pod = {"metadata": {"name": "box"}, "spec": {"hostname": "box", "subdomain": "box"}}
    assert sandbox.has_own_service(legacy_pod)
    assert sandbox.sandbox_fqdn(BODY, legacy_pod) == sandbox.own_service_fqdn("box", "team") == "box.team.svc.cluster.local"
    own = sandbox.service_manifest(BODY)
    assert own["metadata"]["name"] == "box" and own["metadata"]["ownerReferences"] == [sandbox.owner_reference(BODY)]
    assert own["spec"]["clusterIP"] == "None" and own["spec"]["selector"] == {sandbox.SANDBOX_LABEL: "box"}
    assert own["spec"]["publishNotReadyAddresses"] is True


def test_a_pooled_sandbox_is_named_by_its_pod_s_hostname():
    """An adopted warm pod keeps the hostname it was made with (its own name); before it has a pod, a
    sandbox from a pool has no name yet."""
    pooled = {**BODY, "spec": {"pool": "py"}}
    warm = {"metadata": {"name": "py-warm-bcd23"}, "spec": {"hostname": "py-warm-bcd23", "subdomain": sandbox.SANDBOX_SERVICE}}
    assert sandbox.sandbox_fqdn(pooled, warm) == "py-warm-bcd23.agentkube-sandboxes.team.svc.cluster.local"
    assert sandbox.sandbox_fqdn(pooled, None) is None


def test_network_policy_allows_dns_plus_the_union_of_tool_intents():
    policy = sandbox.network_policy_manifest(BODY, _spec())
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert len(policy["spec"]["egress"]) == 1  # DNS only: every intent says `none`
    spec = _spec(tools={"profiles": {
        "web": {"network": {"egress": "internet"}},
        "db": {"network": {"egress": "explicit", "allow": [{"cidr": "10.1.0.0/16", "port": 5432}]}},
    }})
    egress = sandbox.network_policy_manifest(BODY, spec)["spec"]["egress"]
    internet = next(r for r in egress if r["to"][0].get("ipBlock", {}).get("cidr") == "0.0.0.0/0")
    assert "169.254.0.0/16" in internet["to"][0]["ipBlock"]["except"]  # no cloud metadata
    assert {"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 5432}]} in egress


@pytest.mark.parametrize("text,seconds", [("30s", 30), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("250ms", 0.25)])
def test_parse_duration(text, seconds):
    assert sandbox.parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "10", "1d", "m5", "5m x"])
def test_parse_duration_rejects_what_go_would(text):
    with pytest.raises(ValueError):
        sandbox.parse_duration(text)


def test_models_reject_bad_input_too():
    with pytest.raises(ValueError):
        api.AgentSandboxSpec.model_validate({"template": {"image": "x"}, "tools": {"default": {"pids": 0}}})
    with pytest.raises(ValueError):
        api.AgentSandboxSpec.model_validate({"template": {"image": "x"}, "unknown": 1})
