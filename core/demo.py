"""`make demo` (`agentkube demo`): agentkube's main job on the local cluster, as a user meets it.

It brings up the local cluster with its node (the node agent left to the chart), `helm install`s agentkube
with the images built here, applies the example AgentSandbox in a namespace that enforces the Pod Security
`baseline` standard, and runs a scripted coding agent against it (agentkube.demo_agent). Then a ServedModel
with `autoscaling.policy: ppo` is tuned by the installed operator against the simulated Knative revision,
the dashboards are rendered from the real Prometheus, and a summary says what happened and where to look.
Running it twice is harmless (every step is an apply or an upgrade); `agentkube dev down` removes it all.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from agentkube import dashboards
from agentkube.client import Sandbox
from agentkube.demo_agent import USAGE_COLUMNS, Outcome, run_agent, steps, usage_rows
from agentkube.devenv import node
from agentkube.devenv.cluster import DevEnv
from agentkube.devenv.versions import bin_dir

REPOSITORY = Path(__file__).resolve().parent.parent
CHART = REPOSITORY / "charts" / "agentkube"
EXAMPLES = REPOSITORY / "examples"
RELEASE, SYSTEM_NAMESPACE, DEMO_NAMESPACE = "agentkube", "agentkube-system", "agentkube-demo"
SANDBOX_NAME = "coder"  # examples/sandbox.yaml
RUNNING_TIMEOUT = 180.0
# Stand-ins for Knative's Service and PodAutoscaler CRDs: the ServedModel's Knative Service is played by the
# simulated revision (`agentkube rl serve-revision`). Real Knative runs with `agentkube dev up --with-knative`
# (tests/e2e/test_knative.py); the demo does not use it yet.
KNATIVE_CRD = REPOSITORY / "tests" / "manifests" / "knative-service-crd.yaml"
MODEL_NAME, REVISION_JOB = "llm", "knative-revision"
REVISION_SECONDS = 600  # the simulated revision stops by itself after this long
DECISION_TIMEOUT = 120.0


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
    """A ServedModel whose concurrency target the PPO policy tunes, every 10 s for the demo to see it."""
    return {"apiVersion": "agentkube.dev/v1alpha1", "kind": "ServedModel", "metadata": {"name": MODEL_NAME},
            "spec": {"model": {"name": "llama-3-8b"}, "image": "vllm/vllm-openai:latest", "autoscaling": {
                "policy": "ppo", "slo": {"p95LatencyMs": 2000}, "ppo": {"decisionInterval": "10s"}}}}


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
                                f"(phase {self._phase()}); see `kubectl describe agentsandbox -n {DEMO_NAMESPACE}`")
            time.sleep(0.5)
        return Sandbox(SANDBOX_NAME, DEMO_NAMESPACE)

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
        """The ServedModel applied, its revision played by the simulator (scraped by Prometheus), and the
        installed operator's first policy decision."""
        self.tool("kubectl", "apply", "-f", str(KNATIVE_CRD))
        self.tool("kubectl", "wait", "--for=condition=Established", "crd/services.serving.knative.dev", "--timeout=60s")
        self.apply(served_model(), namespace=DEMO_NAMESPACE)
        log = self.env.start_alongside("demo-revision", [
            "env", f"KUBECONFIG={self.env.kubeconfig}", sys.executable, "-m", "agentkube", "rl", "serve-revision",
            "--namespace", DEMO_NAMESPACE, "--service", MODEL_NAME, "--trace", "conversation", "--port", "0",
            "--duration", str(REVISION_SECONDS)])
        address = self._wait(lambda: re.search(r"^listening (127\.0\.0\.1:\d+)$", log.read_text(), re.MULTILINE),
                             60, "the simulated revision did not start").group(1)
        self.env.add_scrape_target(REVISION_JOB, [address])

        def decided() -> dict[str, Any] | None:
            got = self.tool("kubectl", "get", "-n", DEMO_NAMESPACE, f"servedmodel/{MODEL_NAME}", "-o", "json", check=False)
            decision = (json.loads(got.stdout or "{}").get("status") or {}).get("lastDecision") or {}
            return decision if decision.get("reason") == "PolicyDecided" else None

        return self._wait(decided, DECISION_TIMEOUT, "no autoscaling decision by the PPO policy")

    def _wait(self, condition: Callable[[], Any], timeout: float, failure: str) -> Any:
        deadline = time.monotonic() + timeout
        while not (value := condition()):
            if time.monotonic() > deadline:
                raise DemoError(f"{failure} within {timeout:.0f}s")
            time.sleep(0.5)
        return value

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
            self.step("local cluster with its node (first run: builds images)", lambda: self.env.up(timeout=300))
        self.step("helm install agentkube", self.install)
        self.step("Prometheus scrapes the operator and the node agent", self.scrape)
        sandbox = self.step(f"AgentSandbox {SANDBOX_NAME} Running in {DEMO_NAMESPACE} (Pod Security baseline)",
                            self.sandbox_running)
        self.console.print("the scripted agent's tool calls:")
        self.step("agent done", lambda: self.agent(sandbox))
        self.decision = self.step(f"ServedModel {MODEL_NAME}: a concurrency target chosen by the PPO policy",
                                  self.model_decided)
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
            self.console.print(f"ServedModel {MODEL_NAME}: concurrency target {self.decision.get('previousValue')} → "
                               f"{self.decision['value']} ({self.decision['reason']}: {self.decision.get('message', '')})")
        self.console.print(f"prometheus: {self.env.prometheus_url}")
        for picture in pictures:
            self.console.print(f"dashboard:  {picture}")
        self.console.print(f'kubectl:    eval "$(agentkube dev env --state-dir {self.env.layout.root})"')
        self.console.print("tear down:  make down")


class DemoError(RuntimeError):
    """A demo step failed; the message says which and how to look."""


def main(state_dir: Path, quick: bool = False) -> int:
    console = Console(stderr=True)
    env = DevEnv(state_dir, with_node=True, node_agent="none")
    if env.is_up() and env.node_agent != "none":
        console.print(f"[red]the environment in {state_dir} runs the node agent on the host; the demo installs it "
                      "with the chart: run `make down` first[/]")
        return 1
    try:
        return 0 if Demo(env, console, quick).run() else 1
    except DemoError as error:
        console.print(f"[bold red]demo failed:[/] {error}", highlight=False)
        return 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
