"""Claim latency from a warm pool, side by side with a claim that has to start its pod, in one run:

  warm   `Sandbox.create(pool=...)` from an agent's pod through the gateway, from an AgentSandboxPool whose
         warm pods are all Ready (the claim adopts one: no pod starts)
  cold   the same call from a pool of zero replicas (the sandbox starts its pod from the pool's template):
         what a claim costs without a warm pool, on the same control plane and node

Each claim is timed in the agent's pod from the request until the gateway answers that the sandbox runs
(`claim`), and until the first command (`true`) came back from it (`claim → first command`, as hosted
sandboxes are compared); then the sandbox is released (not timed) and, for the warm pool, the next claim
waits until the pool is full again. Warm and cold take turns in rounds, so that the machine's noise falls
on both alike.

With `--agent-sandbox-controller BINARY --agent-sandbox-crds DIR` (kubernetes-sigs/agent-sandbox's controller
built from its source, as the operator benchmark builds it, and its CRDs; nothing of it is committed here), a
controller-level pair is measured too, from the node with the same 5 ms poll for both: an AgentSandbox naming
our pool until it is Running, against agent-sandbox's SandboxClaim of its SandboxWarmPool (same image,
command and resources, 2 replicas) until its Ready condition is True; each released and the pool full again
before the next.

Everything is real: `agentkube dev up --with-node` in a temporary directory, `helm install` of the chart
(operator, gateway, the DaemonSet's node agent), a client pod whose service account is bound to the chart's
sandbox-user role. Writes bench/results/pool_claim.{json,md}. Needs root and the node lock:

    flock /tmp/agentkube-node.lock .venv/bin/python bench/pool_claim.py [--claims 40] [--rounds 2] \\
        [--agent-sandbox-controller BIN --agent-sandbox-crds DIR]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import machine, summary, write_results  # noqa: E402
from sdk_round_trip import SANDBOX, client_pod  # noqa: E402

from agentkube.demo import CHART, chart_values  # noqa: E402
from agentkube.devenv import temporary_env  # noqa: E402
from agentkube.devenv.versions import bin_dir  # noqa: E402

RELEASE, SYSTEM, NAMESPACE = "agentkube", "agentkube-system", "bench-pool"
GOAL_MS = 50.0
WARM_REPLICAS = 2

# Run in the agent's pod: N claims from one pool, each released after its first command; prints the samples.
IN_POD = """
import json, sys, time
from kubernetes import client, config
from agentkube.client import Sandbox
namespace, pool, claims, replicas = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
config.load_incluster_config()
custom = client.CustomObjectsApi()
def ready():
    pool_object = custom.get_namespaced_custom_object("agentkube.dev", "v1alpha1", namespace, "agentsandboxpools", pool)
    return (pool_object.get("status") or {}).get("readyReplicas", 0)
out = {"claim": [], "first_command": [], "warm": [], "errors": []}
for _ in range(claims):
    deadline = time.monotonic() + 120
    while replicas and ready() < replicas and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.perf_counter()
    try:
        box = Sandbox.create(pool, namespace, wait=120)
    except Exception as error:  # a failed claim is a finding, recorded; the run goes on
        out["errors"].append(f"claim: {type(error).__name__}: {error}")
        continue
    claimed = time.perf_counter()
    out["claim"].append((claimed - started) * 1000)
    out["warm"].append(box.claimed.warm)
    try:
        box.run(["true"])
        out["first_command"].append((time.perf_counter() - started) * 1000)
    except Exception as error:
        out["errors"].append(f"first command: {type(error).__name__}: {error}")
    box.release()
print(json.dumps(out))
"""


POLL_SECONDS = 0.005
PEER_FLAGS = ["--extensions", "--enable-webhook=false", "--manage-webhook-certs=false", "--leader-elect=false",
              "--metrics-bind-address=0", "--health-probe-bind-address=0"]


def peer_manifests(image: str) -> list[dict]:
    """agent-sandbox's template and warm pool: the same container as our pool's (no agentkube runtime needed)."""
    container = {"name": "sandbox", "image": image, "imagePullPolicy": "IfNotPresent", "command": ["sleep", "infinity"],
                 "resources": SANDBOX["template"]["resources"]}
    group = "extensions.agents.x-k8s.io/v1beta1"
    return [{"apiVersion": group, "kind": "SandboxTemplate", "metadata": {"name": "warm"},
             "spec": {"podTemplate": {"spec": {"containers": [container]}}}},
            {"apiVersion": group, "kind": "SandboxWarmPool", "metadata": {"name": "warm"},
             "spec": {"replicas": WARM_REPLICAS, "sandboxTemplateRef": {"name": "warm"}}}]


def wait_until(condition, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("not within the time allowed")
        time.sleep(POLL_SECONDS)


class FirstSeen:
    """When a watch first saw each object reach a state (perf_counter seconds, as the claims are timed): where
    a claim's time goes, stage by stage, seen from outside the operator. A watch of its own per kind, bounded
    by `stop` (each watch call ends within WATCH_SECONDS and is started again until then)."""

    WATCH_SECONDS = 5

    def __init__(self, list_call, args: tuple, key, **options) -> None:
        self.seen: dict[str, float] = {}
        self.error: str | None = None  # why the watch ended early, if it did
        self.stop = threading.Event()
        self._args = (list_call, args, key, options)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FirstSeen":
        self._thread.start()
        time.sleep(0.5)  # the watch is open before the first claim
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        self._thread.join(timeout=self.WATCH_SECONDS + 5)

    def _run(self) -> None:
        import kubernetes

        list_call, args, key, options = self._args
        try:
            while not self.stop.is_set():
                for event in kubernetes.watch.Watch().stream(list_call, *args, timeout_seconds=self.WATCH_SECONDS, **options):
                    now = time.perf_counter()
                    name = key(event["object"])
                    if name and name not in self.seen:
                        self.seen[name] = now
                    if self.stop.is_set():
                        break
        except Exception as error:  # noqa: BLE001 — recorded: the stages are then missing, and say why
            self.error = f"{type(error).__name__}: {error}"


def controller_claims(custom, namespace: str, claims: int, core=None,
                      stages: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """The controller-level pair, from the node: ours (an AgentSandbox naming the pool → Running) and
    agent-sandbox's (a SandboxClaim of its warm pool → Ready), taking turns, each pool full before a claim.
    With `core` and `stages`, our claims' stages as watches see them are appended to `stages`: the create
    answered, the warm pod adopted (its claimed-by label), the sandbox Running."""
    ours = ("agentkube.dev", "v1alpha1", namespace)
    theirs = ("extensions.agents.x-k8s.io", "v1beta1", namespace)
    out: dict[str, list[float]] = {"agentkube_controller_claim": [], "agent_sandbox_claim": []}
    if core is not None and stages is not None:
        adopted = FirstSeen(core.list_namespaced_pod, (namespace,),
                            lambda pod: (pod.metadata.labels or {}).get("agentkube.dev/claimed-by"),
                            label_selector="agentkube.dev/claimed-by")
        running = FirstSeen(custom.list_namespaced_custom_object, (ours[0], ours[1], namespace, "agentsandboxes"),
                            lambda box: box["metadata"]["name"] if (box.get("status") or {}).get("phase") == "Running" else None)
        with adopted, running:
            timed = _controller_claims(custom, ours, theirs, claims, out)
        for watch in (adopted, running):
            if watch.error:
                print(f"a stage watch ended early: {watch.error}", file=sys.stderr)
        for name, (started, answered) in timed.items():
            if name in adopted.seen and name in running.seen:
                stages["create answered"].append((answered - started) * 1000)
                stages["answered → pod adopted"].append((adopted.seen[name] - answered) * 1000)
                stages["pod adopted → Running"].append((running.seen[name] - adopted.seen[name]) * 1000)
        return out
    _controller_claims(custom, ours, theirs, claims, out)
    return out


def _controller_claims(custom, ours: tuple, theirs: tuple, claims: int, out: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """The claims, taking turns; for ours, when each was started and its create answered."""
    timed: dict[str, tuple[float, float]] = {}

    def ready(group: tuple, plural: str) -> int:
        return (custom.get_namespaced_custom_object(*group, plural, "warm").get("status") or {}).get("readyReplicas", 0)

    for i in range(claims):
        wait_until(lambda: ready(ours, "agentsandboxpools") >= WARM_REPLICAS)
        name = f"ours-{time.time_ns() % 10**9}-{i}"
        started = time.perf_counter()
        custom.create_namespaced_custom_object(*ours, "agentsandboxes", {
            "apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox", "metadata": {"name": name}, "spec": {"pool": "warm"}})
        timed[name] = (started, time.perf_counter())
        wait_until(lambda name=name: (custom.get_namespaced_custom_object(*ours, "agentsandboxes", name).get("status") or {})
                   .get("phase") == "Running")
        out["agentkube_controller_claim"].append((time.perf_counter() - started) * 1000)
        custom.delete_namespaced_custom_object(*ours, "agentsandboxes", name)

        wait_until(lambda: ready(theirs, "sandboxwarmpools") >= WARM_REPLICAS)
        name = f"theirs-{i}"
        started = time.perf_counter()
        custom.create_namespaced_custom_object(*theirs, "sandboxclaims", {
            "apiVersion": "extensions.agents.x-k8s.io/v1beta1", "kind": "SandboxClaim", "metadata": {"name": name},
            "spec": {"warmPoolRef": {"name": "warm"}}})
        wait_until(lambda name=name: any(c.get("type") == "Ready" and c.get("status") == "True" for c in
                               (custom.get_namespaced_custom_object(*theirs, "sandboxclaims", name).get("status") or {})
                               .get("conditions") or ()))
        out["agent_sandbox_claim"].append((time.perf_counter() - started) * 1000)
        custom.delete_namespaced_custom_object(*theirs, "sandboxclaims", name)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=40, help="per kind")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--agent-sandbox-controller", type=Path, help="kubernetes-sigs/agent-sandbox's controller binary")
    parser.add_argument("--agent-sandbox-crds", type=Path, help="its CRDs (k8s/crds of its source)")
    args = parser.parse_args()
    peer_error = None
    peer_process = None
    per_round = max(1, args.claims // args.rounds)
    samples: dict[str, list[float]] = {k: [] for k in ("warm_claim", "warm_first_command", "cold_claim", "cold_first_command",
                                                          "agentkube_controller_claim", "agent_sandbox_claim")}
    stages: dict[str, list[float]] = {k: [] for k in ("create answered", "answered → pod adopted", "pod adopted → Running")}
    adopted: dict[str, list[bool]] = {"warm": [], "cold": []}  # whether each claim adopted a warm pod
    errors: dict[str, list[str]] = {"warm": [], "cold": []}  # claims or first commands that failed (findings)
    load_before = os.getloadavg()
    env = temporary_env(with_prometheus=False, with_node=True, node_agent="none")
    try:
        env.up()

        def tool(name: str, *argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(bin_dir() / name), *argv], env=env.environ(), capture_output=True, text=True,
                                  input=input, check=check, timeout=900)

        tool("helm", "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace", "--wait", "--timeout=5m",
             *chart_values(env))
        tool("kubectl", "create", "namespace", NAMESPACE)
        for name, replicas in (("warm", WARM_REPLICAS), ("cold", 0)):
            tool("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(
                {"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandboxPool", "metadata": {"name": name},
                 "spec": {"replicas": replicas, "template": SANDBOX}}))
        tool("kubectl", "create", "serviceaccount", "agent", "-n", NAMESPACE)
        tool("kubectl", "create", "rolebinding", "agent-claims", "-n", NAMESPACE, f"--clusterrole={RELEASE}-sandbox-user",
             f"--serviceaccount={NAMESPACE}:agent")
        tool("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(client_pod()))
        tool("kubectl", "wait", "-n", NAMESPACE, "--for=condition=Ready", "pod/client", "--timeout=180s")
        tool("kubectl", "wait", "-n", NAMESPACE, f"--for=jsonpath={{.status.readyReplicas}}={WARM_REPLICAS}",
             "agentsandboxpool/warm", "--timeout=180s")
        # One claim of each kind first, untimed: the gateway's and the SDK's first connections.
        for kind in ("warm", "cold"):
            tool("kubectl", "exec", "-n", NAMESPACE, "client", "--", "python3", "-c", IN_POD, NAMESPACE, kind, "1",
                 str(WARM_REPLICAS if kind == "warm" else 0), check=False)
        custom = core = None
        if args.agent_sandbox_controller and args.agent_sandbox_crds:
            try:  # the peer is optional: its failure is recorded, and our own figures still count
                import kubernetes

                from agentkube.devenv import images

                tool("kubectl", "apply", "--server-side", "-f", str(args.agent_sandbox_crds))
                for crd in ("sandboxes.agents.x-k8s.io", "sandboxtemplates.extensions.agents.x-k8s.io",
                            "sandboxwarmpools.extensions.agents.x-k8s.io", "sandboxclaims.extensions.agents.x-k8s.io"):
                    tool("kubectl", "wait", "--for=condition=Established", f"crd/{crd}", "--timeout=60s")
                peer_log = tempfile.NamedTemporaryFile("w", prefix="agent-sandbox-", suffix=".log", delete=False)
                print(f"agent-sandbox's controller logs to {peer_log.name}", file=sys.stderr)
                peer_process = subprocess.Popen([str(args.agent_sandbox_controller), *PEER_FLAGS, f"--kubeconfig={env.kubeconfig}"],
                                                stdout=peer_log, stderr=subprocess.STDOUT)
                for manifest in peer_manifests(images.SANDBOX_IMAGE):
                    tool("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))
                api_client = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))
                custom, core = kubernetes.client.CustomObjectsApi(api_client), kubernetes.client.CoreV1Api(api_client)
                controller_claims(custom, NAMESPACE, 1)  # untimed: both controllers' first claim
            except Exception as error:  # noqa: BLE001 — recorded in the results as why the peer row is missing
                peer_error = f"{type(error).__name__}: {error}"
                print(f"agent-sandbox's side not measured: {peer_error}", file=sys.stderr)
                custom = None
        for _ in range(args.rounds):
            for kind in ("warm", "cold"):
                done = tool("kubectl", "exec", "-n", NAMESPACE, "client", "--", "python3", "-c", IN_POD, NAMESPACE, kind,
                            str(per_round), str(WARM_REPLICAS if kind == "warm" else 0), check=False)
                if done.returncode != 0:
                    errors[kind].append(f"the round failed: {done.stderr[-500:]}")
                    continue
                out = json.loads(done.stdout)
                samples[f"{kind}_claim"] += out["claim"]
                samples[f"{kind}_first_command"] += out["first_command"]
                adopted[kind] += out["warm"]
                errors[kind] += out["errors"]
            if custom is not None:
                try:
                    for name, values in controller_claims(custom, NAMESPACE, per_round, core, stages).items():
                        samples[name] += values
                except Exception as error:  # noqa: BLE001
                    peer_error = f"{type(error).__name__}: {error}"
                    custom = None
    finally:
        if peer_process is not None:
            peer_process.terminate()
            peer_process.wait(timeout=30)
        env.down()

    stats = {name: summary(values) for name, values in samples.items() if values}
    warm, cold = stats["warm_claim"], stats["cold_claim"]
    result = {"machine": machine(), "claims_per_kind": len(samples["warm_claim"]), "rounds": args.rounds,
              "warm_replicas": WARM_REPLICAS, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "milliseconds": stats, "adopted_a_warm_pod": {k: sum(v) for k, v in adopted.items()}, "errors": errors,
              "ratio_cold_to_warm_p50": cold["p50"] / warm["p50"],
              "goal": f"a claim from a warm pool at most {GOAL_MS:.0f} ms at p50", "goal_met": warm["p50"] <= GOAL_MS,
              "agent_sandbox": {"controller": str(args.agent_sandbox_controller) if args.agent_sandbox_controller else None,
                                "error": peer_error}}
    result["agentkube_controller_stages_milliseconds"] = {name: summary(values) for name, values in stages.items() if values}
    if "agent_sandbox_claim" in stats and "agentkube_controller_claim" in stats:
        result["ratio_agent_sandbox_to_agentkube_controller_p50"] = \
            stats["agent_sandbox_claim"]["p50"] / stats["agentkube_controller_claim"]["p50"]
    labels = {"warm_claim": "pod, SDK → gateway: warm pool, claim → sandbox runs",
              "warm_first_command": "pod, SDK → gateway: warm pool, claim → first command done",
              "cold_claim": "pod, SDK → gateway: no warm pod, claim → sandbox runs",
              "cold_first_command": "pod, SDK → gateway: no warm pod, claim → first command done",
              "agentkube_controller_claim": "node: AgentSandbox naming the pool → Running",
              "agent_sandbox_claim": "node: agent-sandbox SandboxClaim of its SandboxWarmPool → Ready"}
    rows = [[labels[name], f"{s['p50']:.1f}", f"{s['p90']:.1f}", f"{s['p99']:.1f}", str(s["n"])] for name, s in stats.items()]
    rows += [[f"node: stage of ours (watched): {name}", f"{s['p50']:.1f}", f"{s['p90']:.1f}", f"{s['p99']:.1f}", str(s["n"])]
             for name, s in result["agentkube_controller_stages_milliseconds"].items()]
    write_results("pool_claim", result, f"Claims through the gateway from a warm pool and without one ({machine()['cpus']} CPUs)",
                  ["path", "p50 ms", "p90 ms", "p99 ms", "n"], rows,
                  f"Goal: {result['goal']} — {'met' if result['goal_met'] else 'not met'}. Cold/warm at p50: "
                  f"×{result['ratio_cold_to_warm_p50']:.1f}. Claims that adopted a warm pod: warm "
                  f"{result['adopted_a_warm_pod']['warm']}/{len(adopted['warm'])}, cold {result['adopted_a_warm_pod']['cold']}/"
                  f"{len(adopted['cold'])}. Failed claims or first commands: warm {len(errors['warm'])}, cold "
                  f"{len(errors['cold'])} (in the JSON). agent-sandbox beside ours at the controller level (p50): "
                  + (f"×{result['ratio_agent_sandbox_to_agentkube_controller_p50']:.2f} of ours"
                     if "ratio_agent_sandbox_to_agentkube_controller_p50" in result else f"not measured ({peer_error})")
                  + f". Load average "
                  f"before/after: {load_before[0]:.2f} / {result['load_average_after'][0]:.2f} (other work on the machine included).")


if __name__ == "__main__":
    main()
