"""`agentkube capacity interrupt` on the real API server (its requests go through operator/kube.py): a node
that is not a spot node, or does not exist, is refused before anything is touched, and so is a spot node when
there are no NodeClaims to read (no Karpenter). The notice and the NodeClaim's deletion on real Karpenter are in
tests/e2e/test_capacity.py."""

import subprocess
import sys

import kubernetes
import pytest

from agentkube.operator import capacity


def _interrupt(devenv, node: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agentkube", "capacity", "interrupt", node, "--notice", "0"],
                          env=devenv.environ(), capture_output=True, text=True, timeout=120)


@pytest.fixture
def nodes(api_client):
    core = kubernetes.client.CoreV1Api(api_client)
    made = []

    def make(name: str, labels: dict[str, str]) -> str:
        core.create_node({"metadata": {"name": name, "labels": labels},
                          "spec": {"taints": [{"key": "own", "value": "x", "effect": "NoSchedule"}]}})
        made.append(name)
        return name

    yield make
    for name in made:
        core.delete_node(name)


def _taints(api_client, node: str) -> list[str]:
    """The node's taint keys, but for those the controller manager's node lifecycle controller puts on a node
    no kubelet reports for (`node.kubernetes.io/not-ready`, `.../unreachable`), which come when they come."""
    taints = kubernetes.client.CoreV1Api(api_client).read_node(node).spec.taints or []
    return [t.key for t in taints if not t.key.startswith("node.kubernetes.io/")]


def test_a_node_that_is_missing_or_not_spot_is_refused_and_left_alone(devenv, api_client, nodes):
    missing = _interrupt(devenv, "no-such-node")
    assert missing.returncode == 2 and "no-such-node: Not Found" in missing.stderr
    on_demand = nodes("interrupt-on-demand", {capacity.CAPACITY_TYPE_LABEL: "on-demand"})
    refused = _interrupt(devenv, on_demand)
    assert refused.returncode == 2 and "is not a spot node" in refused.stderr
    assert _taints(api_client, on_demand) == ["own"]


def test_a_spot_node_without_karpenter_fails_on_the_missing_nodeclaims_before_any_taint(devenv, api_client, nodes):
    # Without Karpenter's CRDs there is no NodeClaim to delete: the command fails before the notice, so a node
    # never gets a notice that nothing would follow.
    spot = nodes("interrupt-spot", {capacity.CAPACITY_TYPE_LABEL: capacity.SPOT})
    result = _interrupt(devenv, spot)
    assert result.returncode != 0 and "404" in result.stderr
    assert _taints(api_client, spot) == ["own"]
