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

Everything is real: `agentkube dev up --with-node` in a temporary directory, `helm install` of the chart
(operator, gateway, the DaemonSet's node agent), a client pod whose service account is bound to the chart's
sandbox-user role. Writes bench/results/pool_claim.{json,md}. Needs root and the node lock:

    flock /tmp/agentkube-node.lock .venv/bin/python bench/pool_claim.py [--claims 40] [--rounds 2]
"""

import argparse
import json
import os
import subprocess
import sys
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
out = {"claim": [], "first_command": [], "warm": []}
for _ in range(claims):
    deadline = time.monotonic() + 120
    while replicas and ready() < replicas and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.perf_counter()
    box = Sandbox.create(pool, namespace, wait=120)
    claimed = time.perf_counter()
    box.run(["true"])
    first = time.perf_counter()
    out["claim"].append((claimed - started) * 1000)
    out["first_command"].append((first - started) * 1000)
    out["warm"].append(box.claimed.warm)
    box.release()
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=40, help="per kind")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    per_round = max(1, args.claims // args.rounds)
    samples: dict[str, list[float]] = {k: [] for k in ("warm_claim", "warm_first_command", "cold_claim", "cold_first_command")}
    adopted = {"warm": [], "cold": []}  # whether each claim adopted a warm pod
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
                 str(WARM_REPLICAS if kind == "warm" else 0))
        for _ in range(args.rounds):
            for kind in ("warm", "cold"):
                done = tool("kubectl", "exec", "-n", NAMESPACE, "client", "--", "python3", "-c", IN_POD, NAMESPACE, kind,
                            str(per_round), str(WARM_REPLICAS if kind == "warm" else 0))
                out = json.loads(done.stdout)
                samples[f"{kind}_claim"] += out["claim"]
                samples[f"{kind}_first_command"] += out["first_command"]
                adopted[kind] += out["warm"]
    finally:
        env.down()

    stats = {name: summary(values) for name, values in samples.items() if values}
    warm, cold = stats["warm_claim"], stats["cold_claim"]
    result = {"machine": machine(), "claims_per_kind": len(samples["warm_claim"]), "rounds": args.rounds,
              "warm_replicas": WARM_REPLICAS, "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "milliseconds": stats, "adopted_a_warm_pod": {k: sum(v) for k, v in adopted.items()},
              "ratio_cold_to_warm_p50": cold["p50"] / warm["p50"],
              "goal": f"a claim from a warm pool at most {GOAL_MS:.0f} ms at p50", "goal_met": warm["p50"] <= GOAL_MS,
              "agent_sandbox": "not measured in this run (its SandboxClaim beside ours is still to do)"}
    labels = {"warm_claim": "warm pool: claim → sandbox runs", "warm_first_command": "warm pool: claim → first command done",
              "cold_claim": "no warm pod: claim → sandbox runs", "cold_first_command": "no warm pod: claim → first command done"}
    rows = [[labels[name], f"{s['p50']:.1f}", f"{s['p90']:.1f}", f"{s['p99']:.1f}", str(s["n"])] for name, s in stats.items()]
    write_results("pool_claim", result, f"Claims through the gateway from a warm pool and without one ({machine()['cpus']} CPUs)",
                  ["path", "p50 ms", "p90 ms", "p99 ms", "n"], rows,
                  f"Goal: {result['goal']} — {'met' if result['goal_met'] else 'not met'}. Cold/warm at p50: "
                  f"×{result['ratio_cold_to_warm_p50']:.1f}. Claims that adopted a warm pod: warm "
                  f"{result['adopted_a_warm_pod']['warm']}/{len(adopted['warm'])}, cold {result['adopted_a_warm_pod']['cold']}/"
                  f"{len(adopted['cold'])}. agent-sandbox's SandboxClaim: not measured in this run. Load average "
                  f"before/after: {load_before[0]:.2f} / {result['load_average_after'][0]:.2f} (other work on the machine included).")


if __name__ == "__main__":
    main()
