"""Every dashboard panel returns data from the real Prometheus after a short workload, every component's
/metrics passes `promtool check metrics`, and the dashboards render to PNG from the same queries.

The workload, all real: the operator (as the chart's service account) reconciling an AgentSandbox and
running the autoscaling loop of a `policy: ppo` ServedModel against the simulated Knative revision; a
`--local` node agent (root: real cgroups and BPF) with a sandbox that runs a few tool calls, one OOM-killed
and one whose connection is blocked. Prometheus scrapes the three under the scrape jobs the chart's
ServiceMonitors name.

`AGENTKUBE_DASHBOARD_PNGS=DIR` also writes the PNGs to DIR (docs/dashboards for the README).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from kubernetes.client import CustomObjectsApi

from agentkube import dashboards
from agentkube.devenv import process
from agentkube.devenv.cluster import free_port
from agentkube.ebpf.local import LocalNodeAgent
from agentkube.operator import api, autoscaling
from harness import CHART, Operator, host_address, install_knative_crds, install_operator

PY = sys.executable
MODEL = "llm"
REVISION_JOB = "knative-revision"
REVISION_LIFETIME_S = 300  # the simulated revision exits by itself after this long


def instant(prometheus_url: str, expr: str) -> list[dict]:
    response = requests.get(f"{prometheus_url}/api/v1/query", params={"query": expr}, timeout=30)
    response.raise_for_status()
    return list(response.json()["data"]["result"])


class Workload:
    def __init__(self, prometheus_url: str, namespace: str, started_at: float, targets: dict[str, str]):
        self.prometheus_url, self.namespace, self.targets = prometheus_url, namespace, targets
        self.started_at = started_at  # Unix time


@pytest.fixture(scope="module")
def workload(devenv, kubectl, api_client, eventually, tmp_path_factory) -> Iterator[Workload]:
    assert os.geteuid() == 0, "the node agent needs root (cgroups and BPF)"
    logs = tmp_path_factory.mktemp("dashboards")
    namespace = "dashboards-" + uuid.uuid4().hex[:6]
    started: list = []
    started_at = time.time()
    jobs: list[str] = []
    try:
        # The operator, as the chart's service account, with the autoscaling loop reading Prometheus.
        kubeconfig = install_operator(devenv, kubectl)
        install_knative_crds(kubectl)
        operator = Operator(kubeconfig, logs, "--peering=", f"--prometheus-url={devenv.prometheus_url}")
        operator.start()
        started.append(operator)
        operator_address = f"127.0.0.1:{operator.metrics_port}"
        devenv.add_scrape_target(dashboards.OPERATOR_JOB, [operator_address])
        jobs.append(dashboards.OPERATOR_JOB)

        kubectl("create", "namespace", namespace)
        kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps({
            "apiVersion": api.API_VERSION, "kind": "AgentSandbox", "metadata": {"name": "coder"},
            "spec": {"template": {"image": "localhost/agentkube/sandbox:dev"}}}))
        CustomObjectsApi(api_client).create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", {
            "apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": MODEL},
            "spec": {"model": {"name": "llama"}, "image": "vllm", "capacity": {"spot": {"enabled": True}},
                     "autoscaling": {"policy": "ppo", "target": 100,
                                     "ppo": {"decisionInterval": "5s", "maxChangeFraction": 0.5}}}})

        # The simulated Knative revision the loop reads and steers.
        revision_log = logs / "revision.log"
        revision = process.start("revision", [
            "env", f"KUBECONFIG={devenv.kubeconfig}", PY, "-m", "agentkube", "rl", "serve-revision", "--namespace",
            namespace, "--service", MODEL, "--trace", "conversation", "--port", "0", "--duration", str(REVISION_LIFETIME_S),
            "--speed", "4"], revision_log, tie_to_parent=True)
        started.append(revision)
        found = eventually(lambda: re.search(r"^listening (127\.0\.0\.1:\d+)$", revision_log.read_text()
                                             if revision_log.exists() else "", re.MULTILINE),
                           timeout=60, message="the simulated revision did not start serving")
        revision_address = found.group(1)
        devenv.add_scrape_target(REVISION_JOB, [revision_address])
        jobs.append(REVISION_JOB)

        # The node agent, with /metrics, and a sandbox running what coding agents run.
        metrics_port = free_port()
        agent = LocalNodeAgent(agent_args=["--metrics-port", str(metrics_port)]).start()
        started.append(agent)
        agent_address = f"127.0.0.1:{metrics_port}"
        devenv.add_scrape_target(dashboards.NODE_AGENT_JOB, [agent_address])
        jobs.append(dashboards.NODE_AGENT_JOB)
        tools = {"default": {"network": {"egress": "none"}}}
        sandbox = agent.sandbox("coder", namespace, memory="1Gi", cpu="1", pids="512", tools=json.dumps(tools))
        client = sandbox.client
        prometheus_url = devenv.prometheus_url
        # Counters must be scraped before the calls that raise them: a series first seen after its increase
        # shows none (increase() starts from the first sample).
        eventually(lambda: instant(prometheus_url, f'up{{job="{dashboards.NODE_AGENT_JOB}"}} == 1'), timeout=60,
                   message="Prometheus does not scrape the node agent")
        assert client.run(["sh", "-c", "echo warm-up"], timeout=30).exit_code == 0
        eventually(lambda: instant(prometheus_url, "agentkube_tool_call_oom_kills_total"), timeout=60,
                   message="Prometheus did not scrape the first call's counters")
        hog_code = "chunks = []\nwhile True: chunks.append(bytearray(1 << 20))"
        connect_code = f"import socket\nsocket.create_connection(({host_address()!r}, 9), timeout=3)"

        def one_round(index: int) -> None:
            """What a coding agent does: builds and test runs, now and then a memory hog and an egress attempt."""
            assert client.run(["sh", "-c", "echo building; sleep 0.2"], timeout=30).exit_code == 0
            assert client.run(["sh", "-c", "echo 1 test failed; exit 3"], timeout=30).exit_code == 3
            client.run([PY, "-c", "print(sum(range(10**6)))"], timeout=30)
            if index % 4 == 0:
                hog = client.run([PY, "-c", hog_code], memory="64Mi", timeout=60)
                assert hog.usage.oom_kills >= 1
            if index % 3 == 0:
                blocked = client.run([PY, "-c", connect_code], network="none", timeout=30)
                assert blocked.usage.connections_blocked >= 1

        def decided() -> bool:
            model = CustomObjectsApi(api_client).get_namespaced_custom_object(api.GROUP, api.VERSION, namespace,
                                                                              "servedmodels", MODEL)
            return ((model.get("status") or {}).get("lastDecision") or {}).get("reason") == autoscaling.DECIDED

        # Until the loop has decided with the policy at least once (the policy's wish and spot share exist
        # then), and for AGENTKUBE_DASHBOARD_WORKLOAD_S more (longer curves for the README's PNGs).
        deadline = time.monotonic() + float(os.environ.get("AGENTKUBE_DASHBOARD_WORKLOAD_S", "0"))
        give_up = max(deadline, time.monotonic() + 150)
        index = 0
        while not (decided() and time.monotonic() >= deadline):
            assert time.monotonic() < give_up, "the autoscaling loop made no policy decision"
            one_round(index)
            index += 1
            time.sleep(1)
        # The last round's counters scraped.
        time.sleep(3)
        yield Workload(devenv.prometheus_url, namespace, started_at, {"operator": operator_address, "node agent": agent_address,
                                                          "simulated revision": revision_address})
    finally:
        for job in jobs:
            devenv.remove_scrape_target(job)
        for part in reversed(started):
            if isinstance(part, LocalNodeAgent):
                part.close()
            elif isinstance(part, Operator):
                part.stop()
            else:
                process.stop([part])
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_every_panel_query_returns_data(workload, eventually):
    empty: list[str] = []
    for dashboard, panel, query in dashboards.all_queries():
        try:
            eventually(lambda q=query: instant(workload.prometheus_url, q.expr), timeout=60, interval=1,
                       message="no series")
        except AssertionError:
            empty.append(f"{dashboard.title} / {panel.title}: {query.expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


@pytest.mark.parametrize("component", ["operator", "node agent", "simulated revision"])
def test_promtool_check_metrics_is_clean(workload, component):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make deps` installs Debian's prometheus package"
    exposition = requests.get(f"http://{workload.targets[component]}/metrics", timeout=10).text
    assert "# TYPE" in exposition
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert checked.returncode == 0 and not (checked.stdout + checked.stderr).strip(), checked.stdout + checked.stderr


def test_each_dashboard_renders_to_png_from_the_same_queries(workload, tmp_path):
    out = Path(os.environ.get("AGENTKUBE_DASHBOARD_PNGS") or tmp_path)
    written = [dashboards.render_png(dashboard, workload.prometheus_url, out,
                                         minutes=(time.time() - workload.started_at) / 60) for dashboard in dashboards.DASHBOARDS]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# --- the chart ships what this module builds ------------------------------------------------------------
def _helm_template(*args: str) -> list[dict]:
    from agentkube.devenv.versions import bin_dir

    rendered = subprocess.run([str(bin_dir() / "helm"), "template", "agentkube", str(CHART), "--namespace", "monitoring-test",
                               *args], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def test_the_chart_ships_each_dashboard_as_a_labelled_configmap_by_default():
    maps = [d for d in _helm_template() if d["kind"] == "ConfigMap" and d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    shipped = {name: json.loads(text) for m in maps for name, text in m["data"].items()}
    assert shipped == {d.filename: dashboards.build(d) for d in dashboards.DASHBOARDS}
    assert not [d for d in _helm_template("--set", "dashboards.enabled=false")
                if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"].get("labels", {})]


def test_the_prometheus_rule_carries_the_rules_file_and_is_off_by_default():
    assert not [d for d in _helm_template() if d["kind"] in ("PrometheusRule", "ServiceMonitor")]
    rules = yaml.safe_load((CHART / "rules" / "agentkube.rules.yaml").read_text())
    [rule] = [d for d in _helm_template("--set", "prometheusRule.enabled=true", "--set", "prometheusRule.labels.release=kps")
              if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == rules and rule["metadata"]["labels"]["release"] == "kps"


def test_service_monitors_for_the_operator_and_the_node_agent_name_the_jobs_the_alerts_use():
    docs = _helm_template("--set", "serviceMonitor.enabled=true")
    services = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "Service"
                and "agentkube.dev/metrics-job" in d["metadata"]["labels"]}
    monitors = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(services) == set(monitors) == {"operator", "node-agent"}
    for component, job in (("operator", dashboards.OPERATOR_JOB), ("node-agent", dashboards.NODE_AGENT_JOB)):
        service, monitor = services[component], monitors[component]
        assert service["metadata"]["labels"]["agentkube.dev/metrics-job"] == job
        assert monitor["spec"]["jobLabel"] == "agentkube.dev/metrics-job"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == component
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"
