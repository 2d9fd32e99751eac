"""The operator in shards (`--shard I/N`, the chart's `operator.shards`): two shards, each a peering group of
its own replicas running as the chart's service account, on the real API server. Each shard reconciles only
the sandboxes of the namespaces that hash to it; killing a shard's active replica hands its namespaces to
that shard's standby, never to the other shard. (No kubelet here: sandboxes stay Pending, with their pods.)"""

import itertools
import subprocess
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from agentkube.devenv.versions import bin_dir
from agentkube.operator import api, main
from agentkube.operator.shards import Shard, shard_of
from harness import CHART, Operator, helm_template, install_operator

SHARDS = 2
PAUSED, RESUMED = "Pausing operations in favour of", "Resuming operations after the pause"


def _namespaces_by_shard(per_shard: int = 2) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {shard: [] for shard in range(SHARDS)}
    for i in itertools.count():
        name = f"t-shard-{i}"
        if len(found[shard_of(name, SHARDS)]) < per_shard:
            found[shard_of(name, SHARDS)].append(name)
        if all(len(names) == per_shard for names in found.values()):
            return found
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def sharded(devenv, kubectl) -> Path:
    """The chart's service account, RBAC and the peering objects of two shards; the operator's kubeconfig."""
    kubeconfig = install_operator(devenv, kubectl)
    kubectl("apply", "-f", "-", input=helm_template("peering.yaml", values=(f"operator.shards={SHARDS}",)))
    return kubeconfig


@pytest.fixture
def spaces(api_client) -> Iterator[dict[int, list[str]]]:
    core = CoreV1Api(api_client)
    by_shard = _namespaces_by_shard()
    for name in itertools.chain(*by_shard.values()):
        core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
    yield by_shard
    for name in itertools.chain(*by_shard.values()):
        core.delete_namespace(name)


def _render(*values: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(helm_template(values=values)) if doc]


def test_the_chart_runs_each_shard_as_a_deployment_in_a_peering_group_of_its_own(sharded, kubectl):
    # One shard (the default) is the operator as it was: one Deployment, no --shard, the peering `agentkube`.
    [deployment] = [d for d in _render() if d["kind"] == "Deployment" and d["metadata"]["name"] == "agentkube-operator"]
    assert not [a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--shard")]
    assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/instance": "agentkube",
                                                             "app.kubernetes.io/component": "operator"}
    assert [p["metadata"]["name"] for p in _render() if p["kind"] == "ClusterKopfPeering"] == [main.PEERING_NAME]

    documents = _render("operator.shards=3")
    operators = [d for d in documents if d["kind"] == "Deployment" and d["metadata"]["name"].startswith("agentkube-operator")]
    assert [d["metadata"]["name"] for d in operators] == [f"agentkube-operator-shard-{i}" for i in range(3)]
    selectors = []
    for i, deployment in enumerate(operators):
        assert deployment["spec"]["replicas"] == 2  # an active replica and a standby, per shard
        [container] = deployment["spec"]["template"]["spec"]["containers"]
        assert f"--shard={i}/3" in container["args"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        selectors.append(deployment["spec"]["selector"]["matchLabels"])
    # No Deployment's selector matches another shard's pods.
    for mine, theirs in itertools.permutations(range(3), 2):
        assert not selectors[mine].items() <= operators[theirs]["spec"]["template"]["metadata"]["labels"].items()
    # The peering objects the replicas look for (the operator names them; the chart must agree).
    assert [p["metadata"]["name"] for p in documents if p["kind"] == "ClusterKopfPeering"] == [
        Shard(i, 3).peering_name(main.PEERING_NAME) for i in range(3)]
    # `helm test` waits for every shard's Deployment, and may read exactly those.
    [role] = [d for d in documents if d["kind"] == "Role" and d["metadata"]["name"] == "agentkube-test"]
    assert role["rules"][0]["resourceNames"] == [d["metadata"]["name"] for d in operators]
    installed = [d for d in documents if "helm.sh/hook" not in (d["metadata"].get("annotations") or {})]
    kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(installed))
    for wrong in ("0", "65", "two"):  # values.schema.json
        refused = subprocess.run([str(bin_dir() / "helm"), "template", "agentkube", str(CHART), "--set", f"operator.shards={wrong}"],
                                 capture_output=True, text=True)
        assert refused.returncode != 0 and "shards" in refused.stderr


def _sandbox(name: str) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": name},
            "spec": {"template": {"image": "busybox", "command": ["sleep", "infinity"]}}}


def _pool(name: str) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "AgentSandboxPool", "metadata": {"name": name},
            "spec": {"replicas": 1, "template": {"template": {"image": "busybox", "command": ["sleep", "infinity"]}}}}


def _status(api_client, namespace: str, plural: str, name: str) -> dict:
    try:
        found = CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, plural, name)
    except ApiException as error:
        if error.status == 404:
            return {}
        raise
    return dict(found.get("status") or {})


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


def _log(replica: Operator) -> str:
    return replica.log_path.read_text() if replica.starts and replica.log_path.exists() else ""


def _paused(replica: Operator) -> bool:
    log = _log(replica)
    return log.rfind(PAUSED) > log.rfind(RESUMED)


def test_each_shard_reconciles_only_its_namespaces_and_a_killed_active_hands_them_to_its_own_standby(
        sharded, api_client, spaces, eventually, tmp_path):
    custom, core = CustomObjectsApi(api_client), CoreV1Api(api_client)
    replicas = {shard: [Operator(sharded, _directory(tmp_path / f"shard-{shard}-{i}"), f"--shard={shard}/{SHARDS}")
                        for i in range(2)] for shard in range(SHARDS)}

    def create(name: str, shards: tuple[int, ...] = tuple(range(SHARDS))) -> None:
        for shard in shards:
            for namespace in spaces[shard]:
                custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "agentsandboxes", _sandbox(name))

    def pending(name: str, shard: int) -> bool:
        return all(_status(api_client, ns, "agentsandboxes", name).get("phase") == "Pending" for ns in spaces[shard])

    try:
        # Shard 1 alone: shard 0's sandboxes are created first, so once shard 1 has reconciled its own (one
        # watch of all namespaces, delivered in order) it has seen theirs too, and left them alone.
        replicas[1][0].start()
        create("first", (0,))
        model = {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": "llm"},
                 "spec": {"model": {"name": "llama"}, "image": "vllm"}}
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, spaces[1][0], "servedmodels", model)
        # A pool in each shard's first namespace: like sandboxes, each is its namespace's shard's.
        for shard in range(SHARDS):
            custom.create_namespaced_custom_object(api.GROUP, api.VERSION, spaces[shard][0], "agentsandboxpools", _pool("warm"))
        create("first", (1,))
        eventually(lambda: pending("first", 1), timeout=90, message="shard 1 did not reconcile its namespaces")
        eventually(lambda: _status(api_client, spaces[1][0], "agentsandboxpools", "warm").get("replicas") == 1,
                   message="shard 1 did not fill its pool")
        assert core.list_namespaced_pod(spaces[1][0], label_selector="agentkube.dev/pool=warm").items
        # Shard 0's pool: no status, no warm pod, and not even Kopf's bookkeeping annotations (shard 1's
        # change handlers filter it out, so Kopf is blind to it there).
        theirs = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, spaces[0][0], "agentsandboxpools", "warm")
        assert "status" not in theirs
        assert not [a for a in theirs["metadata"].get("annotations") or {} if a.startswith(main.KOPF_PREFIX)]
        for namespace in spaces[0]:
            assert _status(api_client, namespace, "agentsandboxes", "first") == {}
            assert not core.list_namespaced_pod(namespace).items
        # ServedModels are shard 0's, wherever they are: shard 1 has no handler for them (not even Kopf's
        # bookkeeping annotations are written).
        untouched = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, spaces[1][0], "servedmodels", "llm")
        assert "status" not in untouched
        assert not [a for a in untouched["metadata"].get("annotations") or {} if a.startswith(main.KOPF_PREFIX)]

        # Shard 0 with its two replicas (one active, one standby), and shard 1's standby.
        for replica in (replicas[0][0], replicas[0][1], replicas[1][1]):
            replica.start()
        eventually(lambda: pending("first", 0), timeout=90, message="shard 0 did not reconcile its namespaces")
        eventually(lambda: _status(api_client, spaces[0][0], "agentsandboxpools", "warm").get("replicas") == 1,
                   message="shard 0 did not fill its pool")
        eventually(lambda: _status(api_client, spaces[1][0], "servedmodels", "llm").get("conditions"),
                   message="shard 0 did not take the ServedModel in shard 1's namespace")
        eventually(lambda: all(sum(map(_paused, replicas[shard])) == 1 for shard in range(SHARDS)), timeout=60,
                   message="not exactly one standby per shard")
        [active] = [replica for replica in replicas[0] if not _paused(replica)]
        [standby] = [replica for replica in replicas[0] if _paused(replica)]

        # Kill shard 0's active replica: its namespaces go to its standby (after the dead replica's peering
        # record expires, Kopf's 60 s lifetime), never to shard 1's replicas.
        active.kill()
        create("second")
        eventually(lambda: pending("second", 1), timeout=60, message="shard 1 stopped reconciling")
        eventually(lambda: pending("second", 0), timeout=150, message="shard 0's standby did not take over")
        assert RESUMED in _log(standby)
        for namespace in spaces[0]:
            assert f"created pod {namespace}/second" in _log(standby)
            # One pod per sandbox, no more (besides the first namespace's warm pod).
            assert len(core.list_namespaced_pod(namespace, label_selector="!agentkube.dev/pool").items) == 2
        for shard, other in ((0, 1), (1, 0)):
            for replica in replicas[other]:
                assert not [ns for ns in spaces[shard] if f"{ns}/" in _log(replica)], \
                    f"a replica of shard {other} touched shard {shard}'s namespaces"
    finally:
        for replica in itertools.chain(*replicas.values()):
            replica.stop()
