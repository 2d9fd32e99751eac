"""`make demo` (`agentkube demo`): agentkube's main job on the local cluster, as a user meets it.

It brings up the local cluster with its node (the node agent left to the chart), `helm install`s agentkube
with the images built here, applies the example AgentSandbox in a namespace that enforces the Pod Security
`baseline` standard, and runs a scripted coding agent against it (agentkube.demo_agent). Then a ServedModel
with `autoscaling.policy: ppo` becomes a real Knative Service (Knative Serving runs on the node; the model
server is the emulated one, agentkube.modelserver), a bounded load goes through Knative's ingress, and the
installed operator's PPO policy sets the concurrency target from Knative's own metrics in Prometheus. A
second, spot-enabled ServedModel gets Karpenter NodePools from the operator (real Karpenter with its KWOK
provider: real NodeClaims and Nodes whose kubelets kwok simulates, so that model's pods never run), its
replicas land on spot and on-demand nodes, and one spot node is interrupted the way AWS does it (a notice,
then the NodeClaim deleted): its pods' replacements are Ready before the first is evicted. The dashboards
are rendered from that Prometheus, and a summary says what happened and where to look.
Running it twice is harmless (every step is an apply or an upgrade); `agentkube dev down` removes it all.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import kubernetes
import yaml
from rich.console import Console
from rich.table import Table

from agentkube import dashboards, interruption_watch
from agentkube.client import Sandbox
from agentkube.demo_agent import USAGE_COLUMNS, Outcome, run_agent, steps, usage_rows
from agentkube.devenv import images, knative, node
from agentkube.devenv.cluster import DevEnv
from agentkube.devenv.versions import bin_dir

REPOSITORY = Path(__file__).resolve().parent.parent
CHART = REPOSITORY / "charts" / "agentkube"
EXAMPLES = REPOSITORY / "examples"
RELEASE, SYSTEM_NAMESPACE, DEMO_NAMESPACE = "agentkube", "agentkube-system", "agentkube-demo"
SANDBOX_NAME = "coder"  # examples/sandbox.yaml
RUNNING_TIMEOUT = 180.0
MODEL_NAME = "llm"
MODEL_READY_TIMEOUT = 240.0  # the first revision: Knative's reconcilers, the pod, the model's load
DECISION_TIMEOUT = 180.0
LOAD_CLIENTS = 8  # the demo's bounded load: this many clients, one request in flight each, until the decision
SPOT_MODEL_NAME, SPOT_REPLICAS = "llm-spot", 4
INTERRUPTION_NOTICE_S = 10.0  # AWS gives two minutes' notice; the demo plays it in ten seconds


def chart_values(env: DevEnv) -> list[str]:
    """The local node's paths for the chart: its kubelet keeps pods under the environment's directory, and
    the node agent's state goes there too, so that `dev down` removes it."""
    return ["--set", f"nodeAgent.kubeletRootDir={env.layout.node.kubelet_root}",
            "--set", f"nodeAgent.stateDir={env.layout.node.root / 'node-agent-state'}"]


def demo_namespace() -> dict[str, Any]:
    """Where the demo's sandbox runs: a namespace that enforces the Pod Security `baseline` standard."""
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE, "labels": {
        "pod-security.kubernetes.io/enforce": "baseline", "pod-security.kubernetes.io/warn": "baseline"}}}


def served_model() -> dict[str, Any]:
    """A ServedModel on the emulated model server whose concurrency target the PPO policy tunes, every 10 s
    for the demo to see it; one pod kept warm so the first decision needs no cold start."""
    return {"apiVersion": "agentkube.dev/v1alpha1", "kind": "ServedModel", "metadata": {"name": MODEL_NAME},
            "spec": {"model": {"name": "emulated"}, "image": images.MODEL_SERVER_IMAGE, "port": 8080, "autoscaling": {
                "policy": "ppo", "minScale": 1, "maxScale": 3, "slo": {"p95LatencyMs": 2000},
                "ppo": {"decisionInterval": "10s"}}}}


def spot_model() -> dict[str, Any]:
    """A ServedModel on spot capacity: four replicas, at most half on spot, over an on-demand base of one. The
    operator makes Karpenter NodePools for it; its pods go to Karpenter's simulated nodes (kwok), where they
    never run, so the demo sends no requests to it."""
    return {"apiVersion": "agentkube.dev/v1alpha1", "kind": "ServedModel", "metadata": {"name": SPOT_MODEL_NAME},
            "spec": {"model": {"name": "emulated"}, "image": images.MODEL_SERVER_IMAGE, "port": 8080,
                     "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                     "autoscaling": {"policy": "fixed", "minScale": SPOT_REPLICAS, "maxScale": SPOT_REPLICAS,
                                     "initialScale": SPOT_REPLICAS},
                     "capacity": {"spot": {"enabled": True, "onDemandBase": 1, "maxSpotFraction": 0.5}}}}


class BoundedLoad:
    """`clients` threads, each with one completion in flight through Knative's ingress (`Host:` the
    Service's), from `with` until its end: a load that stops by itself and counts the answers."""

    def __init__(self, ingress: str, host: str, clients: int):
        self.ingress, self.host, self.clients = ingress, host, clients
        self.answered: dict[int, int] = {}  # HTTP status (0: no answer) → count
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.ingress, headers={"Host": self.host}, timeout=60) as client:
            while not self._stop.is_set():
                try:
                    status = client.post("/v1/completions", json={"prompt": "the demo", "max_tokens": 32}).status_code
                except httpx.HTTPError:
                    status = 0
                self.answered[status] = self.answered.get(status, 0) + 1

    def __enter__(self) -> BoundedLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=65)


def example_sandbox() -> dict[str, Any]:
    """The README's example AgentSandbox, exactly as users copy it."""
    return yaml.safe_load((EXAMPLES / "sandbox.yaml").read_text())


@dataclass
class Demo:
    """One run of the demo against an environment; each step is idempotent."""

    env: DevEnv
    console: Console
    quick: bool = False
    outcomes: list[Outcome] = field(default_factory=list)
    decision: dict[str, Any] | None = None
    answered: dict[int, int] = field(default_factory=dict)  # the load's answers by HTTP status
    interruption: interruption_watch.Interruption | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def tool(self, name: str, *args: str, input: str | None = None, check: bool = True,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(bin_dir() / name), *args], env=self.env.environ(), capture_output=True, text=True,
                                input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise DemoError(f"{name} {' '.join(args)} failed:\n{result.stderr.strip() or result.stdout.strip()}")
        return result

    def step(self, title: str, action: Callable[[], Any]) -> Any:
        started = time.monotonic()
        with self.console.status(title):
            value = action()
        self.timings[title] = time.monotonic() - started
        self.console.print(f"[green]✓[/] {title} [dim]({self.timings[title]:.1f}s)[/]")
        return value

    # ----- the steps ------------------------------------------------------------------------------
    def install(self) -> None:
        self.tool("helm", "upgrade", "--install", RELEASE, str(CHART), "-n", SYSTEM_NAMESPACE, "--create-namespace",
                  "--wait", "--timeout=5m", *chart_values(self.env),
                  "--set", f"operator.prometheusUrl={self.env.prometheus_url}")

    def apply(self, *objects: dict[str, Any], namespace: str | None = None) -> None:
        where = ["-n", namespace] if namespace else []
        self.tool("kubectl", "apply", *where, "-f", "-", input="\n---\n".join(json.dumps(o) for o in objects))

    def sandbox_running(self) -> Sandbox:
        self.apply(demo_namespace())
        self.apply(example_sandbox(), namespace=DEMO_NAMESPACE)
        deadline = time.monotonic() + RUNNING_TIMEOUT
        while self._phase() != "Running":
            if time.monotonic() > deadline:
                raise DemoError(f"AgentSandbox {SANDBOX_NAME} not Running after {RUNNING_TIMEOUT:.0f}s "
                                f"(phase {self._phase()}: {self._why()}); see `kubectl describe agentsandbox -n {DEMO_NAMESPACE}`")
            time.sleep(0.5)
        return Sandbox(SANDBOX_NAME, DEMO_NAMESPACE)

    def _why(self) -> str:
        """The sandbox's own account of its phase (its Ready condition's message), e.g. why its pod is unschedulable."""
        got = self.tool("kubectl", "get", "-n", DEMO_NAMESPACE, f"agentsandbox/{SANDBOX_NAME}", "-o",
                        'jsonpath={.status.conditions[?(@.type=="Ready")].message}', check=False)
        return got.stdout or "no status"

    def _phase(self) -> str | None:
        got = self.tool("kubectl", "get", "-n", DEMO_NAMESPACE, f"agentsandbox/{SANDBOX_NAME}", "-o",
                        "jsonpath={.status.phase}", check=False)
        return got.stdout or None

    def scrape(self) -> None:
        """Have the local Prometheus scrape the installed operator's pods and the node agent (what the
        chart's ServiceMonitors do where the Prometheus Operator runs), under the jobs the dashboards read."""
        pods = json.loads(self.tool("kubectl", "get", "pods", "-n", SYSTEM_NAMESPACE, "-l",
                                    "app.kubernetes.io/component=operator", "-o", "json").stdout)["items"]
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        self.env.add_scrape_target(dashboards.OPERATOR_JOB, [f"{p['status']['podIP']}:{values['operator']['metricsPort']}"
                                                              for p in pods if p["status"].get("podIP")])
        self.env.add_scrape_target(dashboards.NODE_AGENT_JOB, [f"{node.NODE_IP}:{values['nodeAgent']['metricsPort']}"])

    def model_decided(self) -> dict[str, Any]:
        """The ServedModel becomes a real Knative Service; a bounded load goes through Knative's ingress until
        the installed operator's PPO policy has decided from Knative's metrics in Prometheus."""
        self.apply(served_model(), namespace=DEMO_NAMESPACE)

        def ready() -> str | None:
            status = self._model_status()
            return status.get("url") if status.get("ready") else None

        url = self._wait(ready, MODEL_READY_TIMEOUT, f"ServedModel {MODEL_NAME} not Ready "
                                                     f"(see `kubectl describe servedmodel -n {DEMO_NAMESPACE} {MODEL_NAME}`)")

        def decided() -> dict[str, Any] | None:
            decision = self._model_status().get("lastDecision") or {}
            return decision if decision.get("reason") == "PolicyDecided" else None

        ingress = self.tool("kubectl", "get", "service", "-n", knative.SYSTEM_NAMESPACE, knative.TRAEFIK_SERVICE,
                            "-o", "jsonpath={.spec.clusterIP}").stdout
        with BoundedLoad(f"http://{ingress}:{knative.TRAEFIK_HTTP_PORT}", url.removeprefix("http://"), LOAD_CLIENTS) as load:
            decision = self._wait(decided, DECISION_TIMEOUT, "no autoscaling decision by the PPO policy")
        self.answered = load.answered
        return decision

    def _model_status(self) -> dict[str, Any]:
        got = self.tool("kubectl", "get", "-n", DEMO_NAMESPACE, f"servedmodel/{MODEL_NAME}", "-o", "json", check=False)
        return json.loads(got.stdout or "{}").get("status") or {}

    def _wait(self, condition: Callable[[], Any], timeout: float, failure: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise DemoError(f"{failure} within {timeout:.0f}s")
            time.sleep(0.5)
        return value

    def spot_interrupted(self) -> interruption_watch.Interruption:
        """The spot model steady on Karpenter's nodes (the model was applied early: Karpenter launches its
        nodes meanwhile), then one of its spot nodes interrupted and followed until all is back."""
        api_client = kubernetes.config.new_client_from_config(config_file=str(self.env.kubeconfig))
        try:
            outcome = interruption_watch.play(api_client, self.env.environ(), DEMO_NAMESPACE, SPOT_MODEL_NAME,
                                              SPOT_REPLICAS, INTERRUPTION_NOTICE_S)
        except interruption_watch.InterruptionNotPlayed as error:
            raise DemoError(f"spot interruption of ServedModel {SPOT_MODEL_NAME}: {error} (see `kubectl get "
                            f"nodeclaims,nodes` and `kubectl describe servedmodel -n {DEMO_NAMESPACE} {SPOT_MODEL_NAME}`)") from error
        finally:
            api_client.close()
        if not outcome.replaced_before_eviction:
            raise DemoError(f"a pod on the interrupted node {outcome.node} went before its replacement was Ready: {outcome}")
        return outcome

    def render(self) -> list[Path]:
        out = self.env.layout.root / "dashboards"
        return [dashboards.render_png(board, self.env.prometheus_url, out, minutes=5) for board in dashboards.DASHBOARDS]

    def agent(self, sandbox: Sandbox) -> None:
        def show(outcome: Outcome) -> None:
            mark = "[green]✓[/]" if outcome.as_expected else "[red]✗[/]"
            self.console.print(f"  {mark} {outcome.step.title}: [dim]{outcome.step.expect}[/]")

        self.outcomes = run_agent(sandbox, steps(self.quick), on_step=show)

    # ----- the whole run ----------------------------------------------------------------------------
    def run(self) -> bool:
        """The demo from a possibly fresh machine to its summary; True when every call went as expected."""
        if not self.env.is_up():
            self.step("local cluster with its node, Knative Serving and Karpenter (first run: builds images)",
                      lambda: self.env.up(timeout=600))
        self.step("helm install agentkube", self.install)
        self.step("Prometheus scrapes the operator and the node agent", self.scrape)
        # Applied now so that Karpenter launches its nodes while the agent runs.
        self.step(f"ServedModel {SPOT_MODEL_NAME} with spot capacity applied",
                  lambda: self.apply(demo_namespace(), spot_model(), namespace=DEMO_NAMESPACE))
        sandbox = self.step(f"AgentSandbox {SANDBOX_NAME} Running in {DEMO_NAMESPACE} (Pod Security baseline)",
                            self.sandbox_running)
        self.console.print("the scripted agent's tool calls:")
        self.step("agent done", lambda: self.agent(sandbox))
        self.decision = self.step(f"ServedModel {MODEL_NAME} on Knative: a concurrency target chosen by the PPO policy",
                                  self.model_decided)
        self.interruption = self.step(f"ServedModel {SPOT_MODEL_NAME} on spot and on-demand Karpenter nodes; a spot "
                                      "node interrupted, its pods replaced before any was evicted", self.spot_interrupted)
        # Two scrapes of the counters the calls raised (the local Prometheus scrapes every second).
        time.sleep(3)
        pictures = self.step("dashboards rendered from Prometheus", self.render)
        self.summary(pictures)
        return all(o.as_expected for o in self.outcomes)

    def summary(self, pictures: list[Path]) -> None:
        view = self.tool("kubectl", "get", "agentkube", "-A", check=False).stdout
        self.console.rule("agentkube")
        self.console.print(view.rstrip(), highlight=False)
        table = Table(*USAGE_COLUMNS, title="tool calls, each in its own cgroup")
        for row in usage_rows(self.outcomes):
            table.add_row(*row)
        self.console.print(table)
        if self.decision:
            # The policy decides on every interval after this one: the TARGET `kubectl get` shows above is its latest.
            self.console.print(f"ServedModel {MODEL_NAME} (a Knative Service): the policy's first decision, concurrency "
                               f"target {self.decision.get('previousValue')} → {self.decision['value']} "
                               f"({self.decision['reason']}: {self.decision.get('message', '')}; TARGET above is its "
                               f"latest); the demo's load: "
                               f"{self.answered.get(200, 0)} of {sum(self.answered.values())} requests answered")
        if self.interruption:
            moment = self.interruption

            def placed(placement: dict[str, int]) -> str:
                return ", ".join(f"{count} on {kind}" for kind, count in sorted(placement.items()))

            self.console.print(f"ServedModel {SPOT_MODEL_NAME} (spot: on-demand base 1, at most half on spot): "
                               f"{placed(moment.placement_before)}; spot node {moment.node} interrupted "
                               f"({INTERRUPTION_NOTICE_S:g} s notice) with {moment.on_node} of its pods: "
                               f"{moment.ready_elsewhere_at_first_eviction} pods Ready off the node before the first "
                               f"eviction (the revision had {moment.pods_before}); back to {moment.pods_after} pods in "
                               f"{moment.restored_s} s, "
                               f"{placed(moment.placement_after)}")
        self.console.print(f"prometheus: {self.env.prometheus_url}")
        for picture in pictures:
            self.console.print(f"dashboard:  {picture}")
        self.console.print(f'kubectl:    eval "$(agentkube dev env --state-dir {self.env.layout.root})"')
        self.console.print("tear down:  make down")


class DemoError(RuntimeError):
    """A demo step failed; the message says which and how to look."""


def main(state_dir: Path, quick: bool = False) -> int:
    console = Console(stderr=True)
    running = DevEnv(state_dir)  # what is up already, if anything
    if running.is_up() and (running.node_agent != "none" or not running.with_knative or not running.with_capacity):
        console.print(f"[red]the environment in {state_dir} was brought up without Knative or Karpenter, or with the node "
                      "agent on the host; the demo needs both and installs the node agent with the chart: run `make down` "
                      "first[/]")
        return 1
    env = DevEnv(state_dir, with_node=True, node_agent="none", with_knative=True, with_capacity=True)
    try:
        return 0 if Demo(env, console, quick).run() else 1
    except DemoError as error:
        console.print(f"[bold red]demo failed:[/] {error}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
