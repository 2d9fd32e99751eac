"""The SDK's round trip into a sandbox pod on the real node, with where the time goes, side by side in one run:

  host      `true` started on the host (posix_spawn, and subprocess.run as most callers do)
  node      the SDK on the node, through the sandbox runtime's socket (`Sandbox(name, ns).run(["true"])`),
            and the same socket's status request (SDK → runtime → node agent → back: the path without a call)
  port      the runtime's TCP port straight from the node with the sandbox's runtime token (what the
            gateway sends, minus the gateway), and the runtime's proof on a new connection (what the gateway
            asks once per connection before it sends anything)
  api       the API requests the gateway made for a call without its watch (SubjectAccessReview, the
            sandbox, its pod), as it made them, from the node
  gateway   the SDK in an agent's pod through the gateway (`Sandbox.connect(...).run(["true"])`), timed in
            the pod, with the gateway's watch of sandboxes on (no API request per call) and off (the sandbox
            and its pod read per call: the gateway before), the two alternating by round (a rollout of the
            gateway's Deployment with AGENTKUBE_GATEWAY_WATCH_SANDBOXES between them); and the gateway's
            /healthz from the same pod (the network and HTTP floor)

Everything is real: `agentkube dev up --with-node` in a temporary directory, `helm install` of the chart
(the DaemonSet's node agent, the gateway's two replicas, the operator), an AgentSandbox, a client pod whose
service account is bound to the chart's sandbox-user role. The methods take turns in rounds so that the
machine's noise falls on all alike. Writes bench/results/sdk_round_trip.{json,md}. Needs root and the node
lock.

    .venv/bin/python bench/sdk_round_trip.py [--calls 300] [--rounds 3]
"""

import argparse
import asyncio
import base64
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from nodeagent_common import machine, summary, write_results  # noqa: E402

from agentkube.client import Sandbox  # noqa: E402
from agentkube.contract import RUNTIME_PROOF_PATH, proof_nonce, runtime_token  # noqa: E402
from agentkube.demo import CHART, chart_values  # noqa: E402
from agentkube.devenv import images, temporary_env  # noqa: E402
from agentkube.devenv.versions import bin_dir  # noqa: E402

RELEASE, SYSTEM, NAMESPACE, NAME = "agentkube", "agentkube-system", "bench-rt", "agent"
GOAL_MS = 3.0
SANDBOX = {"template": {"image": images.SANDBOX_IMAGE,
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}}},
           "tools": {"default": {"memory": "128Mi", "cpu": "1", "pids": 64, "timeout": "1m", "network": {"egress": "none"}}}}

# Run in the agent's pod: N calls of `true` through the gateway, and N /healthz requests on the same kind of
# kept-alive client, in alternation; prints the samples (ms).
IN_POD = """
import json, sys, time, httpx
from agentkube.client import IN_CLUSTER_GATEWAY, Sandbox, gateway_credentials
namespace, name, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
box = Sandbox.connect(name, namespace)
health = httpx.Client(verify=gateway_credentials(None, None)[2])  # TLS like the SDK's
box.run(["true"]); health.get(IN_CLUSTER_GATEWAY + "/healthz")
out = {"gateway_run": [], "gateway_healthz": []}
def timed(name, run):
    started = time.perf_counter()
    run()
    out[name].append((time.perf_counter() - started) * 1000)
for _ in range(calls):
    timed("gateway_run", lambda: box.run(["true"]))
    timed("gateway_healthz", lambda: health.get(IN_CLUSTER_GATEWAY + "/healthz"))
print(json.dumps(out))
"""


def timed(run, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def client_pod() -> dict:
    from agentkube.devenv.images import read_chart_images

    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"}, "spec": {
        "serviceAccountName": "agent", "terminationGracePeriodSeconds": 1,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{"name": "agent", "image": read_chart_images()["operator"], "imagePullPolicy": "IfNotPresent",
                        "command": ["python3", "-c", "import time; time.sleep(86400)"],
                        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="per method")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_round = args.calls // args.rounds
    samples: dict[str, list[float]] = {k: [] for k in (
        "host_posix_spawn", "host_subprocess", "node_run", "node_status", "port_run", "port_proof", "api_requests",
        "api_requests_models", "gateway_run", "gateway_run_direct", "gateway_healthz")}
    load_before = os.getloadavg()
    env = temporary_env(with_prometheus=False, with_node=True, node_agent="none")
    try:
        env.up()

        def tool(name: str, *argv: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(bin_dir() / name), *argv], env=env.environ(), capture_output=True, text=True,
                                  input=input, check=check, timeout=600)

        tool("helm", "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace", "--wait", "--timeout=5m",
             *chart_values(env))
        tool("kubectl", "create", "namespace", NAMESPACE)
        tool("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(
            {"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox", "metadata": {"name": NAME}, "spec": SANDBOX}))
        tool("kubectl", "create", "serviceaccount", "agent", "-n", NAMESPACE)
        tool("kubectl", "create", "rolebinding", "agent-runs", "-n", NAMESPACE, f"--clusterrole={RELEASE}-sandbox-user",
             f"--serviceaccount={NAMESPACE}:agent")
        tool("kubectl", "apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(client_pod()))
        tool("kubectl", "wait", "-n", NAMESPACE, "--for=condition=Ready", "pod/client", "--timeout=180s")
        tool("kubectl", "wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Running", f"agentsandbox/{NAME}",
             "--timeout=180s")
        sandbox = json.loads(tool("kubectl", "get", "-n", NAMESPACE, f"agentsandbox/{NAME}", "-o", "json").stdout)
        pod = json.loads(tool("kubectl", "get", "-n", NAMESPACE, f"pod/{NAME}", "-o", "json").stdout)
        key = base64.b64decode(json.loads(tool("kubectl", "get", "-n", SYSTEM, "secret", f"{RELEASE}-runtime-key", "-o",
                                               "json").stdout)["data"]["key"]).strip()
        token = runtime_token(key, NAMESPACE, NAME, sandbox["metadata"]["uid"])

        import httpx

        local = Sandbox(NAME, NAMESPACE)
        port = httpx.Client(base_url=f"http://{pod['status']['podIP']}:7070",
                            headers={"Authorization": f"Bearer {token}"})
        from agentkube.gateway import Caller, KubernetesApi, access_review

        api = KubernetesApi(str(env.kubeconfig))
        review = access_review(Caller(username=f"system:serviceaccount:{NAMESPACE}:agent", uid="",
                                    groups=("system:serviceaccounts",), extra=()), NAMESPACE, NAME)

        async def gateway_requests() -> None:  # as Gateway.run makes them for one call (its review cache aside)
            await api.review_access(review)
            await asyncio.gather(api.sandbox(NAMESPACE, NAME), api.pod(NAMESPACE, NAME))

        def as_models(call, *argv) -> dict:  # the gateway's reads before: the client's models, back to dicts
            return api.client.sanitize_for_serialization(call(*argv))

        async def gateway_requests_as_models() -> None:
            await asyncio.to_thread(as_models, api.authz.create_subject_access_review, review)
            await asyncio.gather(asyncio.to_thread(as_models, api.custom.get_namespaced_custom_object, "agentkube.dev",
                                                   "v1alpha1", NAMESPACE, "agentsandboxes", NAME),
                                 asyncio.to_thread(as_models, api.core.read_namespaced_pod, NAME, NAMESPACE))

        def port_run() -> None:
            port.post("/v1/run", json={"argv": ["true"]}).raise_for_status()

        def port_proof() -> None:  # a new connection each time, as the gateway's first call to a runtime makes
            # (http.client, not a new httpx.Client: that builds an SSL context, ~15 ms, which this hop never has)
            fresh = http.client.HTTPConnection(pod["status"]["podIP"], 7070, timeout=10)
            try:
                fresh.request("GET", f"{RUNTIME_PROOF_PATH}?nonce={proof_nonce()}")
                answer = fresh.getresponse()
                assert answer.status == 200 and b"proof" in answer.read()
            finally:
                fresh.close()

        def gateway_watch(on: bool) -> None:
            deployment = f"deployment/{RELEASE}-gateway"
            tool("kubectl", "set", "env", "-n", SYSTEM, deployment, f"AGENTKUBE_GATEWAY_WATCH_SANDBOXES={str(on).lower()}")
            tool("kubectl", "rollout", "status", "-n", SYSTEM, deployment, "--timeout=300s")

        loop = asyncio.new_event_loop()
        local.run(["true"])
        loop.run_until_complete(gateway_requests())
        try:
            port_run()
        except httpx.HTTPError as error:  # the sandbox's NetworkPolicy may keep the node out too
            print(f"the runtime's port is not reachable from the node ({error!r}): leaving that row out", file=sys.stderr)
            port_run = None  # type: ignore[assignment]
        for _ in range(args.rounds):
            samples["host_posix_spawn"] += timed(lambda: os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0),
                                                 per_round)
            samples["host_subprocess"] += timed(lambda: subprocess.run(["true"], check=True), per_round)
            samples["node_run"] += timed(lambda: local.run(["true"]), per_round)
            samples["node_status"] += timed(local.status, per_round)
            if port_run is not None:
                samples["port_run"] += timed(port_run, per_round)
                samples["port_proof"] += timed(port_proof, per_round)
            samples["api_requests"] += timed(lambda: loop.run_until_complete(gateway_requests()), per_round)
            samples["api_requests_models"] += timed(lambda: loop.run_until_complete(gateway_requests_as_models()), per_round)
            for watching in (True, False):
                gateway_watch(watching)
                done = tool("kubectl", "exec", "-n", NAMESPACE, "client", "--", "python3", "-c", IN_POD, NAMESPACE, NAME,
                            str(per_round))
                for name, values in json.loads(done.stdout).items():
                    samples[name if watching or name != "gateway_run" else "gateway_run_direct"] += values
        loop.close()
    finally:
        env.down()

    stats = {name: summary(values) for name, values in samples.items() if values}
    result = {"machine": machine(), "calls_per_method": args.calls, "rounds": args.rounds,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "milliseconds": stats,
              "goal": f"`true` through the SDK into a pod at most {GOAL_MS} ms at p50",
              "goal_met": {"node": stats["node_run"]["p50"] <= GOAL_MS, "gateway": stats["gateway_run"]["p50"] <= GOAL_MS}}
    labels = {
        "host_posix_spawn": "host: posix_spawn + wait of `true`",
        "host_subprocess": "host: subprocess.run(['true'])",
        "node_run": "node: SDK → runtime socket → tool call (`true`)",
        "node_status": "node: SDK → runtime socket → node agent status (no call)",
        "port_run": "node → runtime's TCP port → tool call (the gateway's leg)",
        "port_proof": "node → runtime's TCP port: a new connection and the runtime's proof (once per gateway connection)",
        "api_requests": "node: the gateway's API requests for one call without its watch (SAR, sandbox, pod), as JSON",
        "api_requests_models": "node: the same, read into the client's models and back (the gateway before that)",
        "gateway_run": "pod: SDK → gateway (watch of sandboxes: no API request) → runtime → tool call (`true`)",
        "gateway_run_direct": "pod: the same with the gateway's watch off (the sandbox and its pod read per call)",
        "gateway_healthz": "pod: gateway /healthz (network + HTTP floor)",
    }
    rows = [[labels[name], f"{s['p50']:.2f}", f"{s['p90']:.2f}", f"{s['p99']:.2f}", str(s["n"])] for name, s in stats.items()]
    write_results("sdk_round_trip", result, f"The SDK's round trip into a sandbox pod ({machine()['cpus']} CPUs)",
                  ["path", "p50 ms", "p90 ms", "p99 ms", "n"], rows,
                  f"Goal: {result['goal']} — node-local {'met' if result['goal_met']['node'] else 'not met'}, through the "
                  f"gateway {'met' if result['goal_met']['gateway'] else 'not met'}. Load average before/after: "
                  f"{load_before[0]:.2f} / {result['load_average_after'][0]:.2f} (other work on the machine included).")


if __name__ == "__main__":
    main()
