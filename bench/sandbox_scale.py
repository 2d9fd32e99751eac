"""How fast a sandbox controller turns N sandbox objects into N pods, on one local control plane.

The harness knows nothing of agentkube: it creates the objects in a directory of manifests N times
(`metadata.name` gets a `-<i>` suffix), watches pods whose first owner reference names one of them, and
records, per object, the time from its create call returning to its pod appearing in the watch. So any
controller can be measured by the same harness on the same control plane (`--controller-command`, e.g.
kubernetes-sigs/agent-sandbox's Go controller with its own manifests).

Side by side in one run:
  * `direct`: the harness creates the pods itself (the API server's own ceiling for this client);
  * `agentkube`: AgentSandbox objects reconciled by `agentkube operator run`;
  * `agent-sandbox` (with `--agent-sandbox-source DIR`, a checkout of kubernetes-sigs/agent-sandbox): its Go
    controller, built here from that source as its Dockerfile builds it (cached by the source's digest; nothing
    of it is committed), with its CRDs.

Without nodes the pods stay Pending (nothing schedules them): the run measures the controllers alone. With
`--kwok-nodes N`, kube-scheduler and kwok (the devenv's, as `agentkube dev up --with-capacity` runs it) bind
the pods to N simulated nodes and play them Running and Ready, so every pod also sends the controller the
events of a real one.

    .venv/bin/python bench/sandbox_scale.py --count 1000 --agent-sandbox-source DIR
    .venv/bin/python bench/sandbox_scale.py --count 10000 --kwok-nodes 200 --agent-sandbox-source DIR

Writes bench/results/sandbox_scale.{json,md} (with `--kwok-nodes`: sandbox_scale_kwok.{json,md}).
"""

import argparse
import concurrent.futures
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import kubernetes
import psutil
import yaml

from agentkube.devenv import capacity, process, temporary_env
from agentkube.devenv.install import ensure_go_program
from agentkube.devenv.versions import bin_dir

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
CREATE_THREADS = 8
# A simulated node's room: enough that N nodes hold one scenario's pods without any resource running out.
KWOK_NODE_CAPACITY = {"cpu": "1000", "memory": "4Ti", "pods": "250"}
AGENT_SANDBOX_FLAGS = ["--enable-webhook=false", "--manage-webhook-certs=false", "--leader-elect=false",
                       "--metrics-bind-address=0", "--health-probe-bind-address=0"]


def _load_manifests(directory: Path) -> list[dict]:
    documents = []
    for path in sorted(directory.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


class PodWatch:
    """Records when the pod owned by each named object first appears."""

    def __init__(self, api_client, namespace: str):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        watch = kubernetes.watch.Watch()
        while not self.stop.is_set():
            try:
                for event in watch.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                    owners = event["object"].metadata.owner_references or []
                    name = owners[0].name if owners else event["object"].metadata.name
                    with self.lock:
                        self.seen.setdefault(name, time.monotonic())
                    if self.stop.is_set():
                        break
            except kubernetes.client.ApiException as error:
                # A busy API server can refuse to resume at a resourceVersion its cache has not reached
                # (504 "Too large resource version") or no longer has (410): list afresh. Pods seen before
                # keep their first time; the others are timed by the new list.
                print(f"pod watch restarted after {error.status} {error.reason}")
                watch = kubernetes.watch.Watch()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def run_scenario(name: str, api_client, manifests: list[dict], count: int, namespace: str,
                 controller_command: list[str] | None, env: dict[str, str], timeout: float,
                 control_plane: list[int] = ()) -> dict:
    """`control_plane`: the pids of kube-apiserver and etcd, whose CPU time during the scenario is recorded
    (the work a controller's requests cost the API server)."""
    core = kubernetes.client.CoreV1Api(api_client)
    core.create_namespace({"metadata": {"name": namespace}})
    # Pods are refused until the controller manager has made the namespace's default service account.
    while not core.list_namespaced_service_account(namespace, field_selector="metadata.name=default").items:
        time.sleep(0.1)
    dynamic = kubernetes.dynamic.DynamicClient(api_client)
    controller = None
    peak_rss = 0
    if controller_command:
        log = open(Path(tempfile.gettempdir()) / f"sandbox_scale-{name}.log", "w")
        # It dies with the harness, even a harness killed outright (its control plane does too).
        controller = subprocess.Popen(controller_command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=process.die_with_parent)
        time.sleep(3)  # let it log in and start watching before the clock starts
    watch = PodWatch(api_client, namespace)
    watch.thread.start()
    created: dict[str, float] = {}

    def create(index: int) -> None:
        for manifest in manifests:
            body = json.loads(json.dumps(manifest))
            body["metadata"]["name"] = f"{body['metadata']['name']}-{index}"
            resource = dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
            resource.create(body=body, namespace=namespace)
            created[body["metadata"]["name"]] = time.monotonic()

    plane_cpu_before = sum(_cpu_seconds(pid) for pid in control_plane)
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, range(count)))
    created_all = time.monotonic()
    cpu_seconds = 0.0
    while watch.count() < count * len(manifests) and time.monotonic() - started < timeout:
        if controller is not None:
            peak_rss = max(peak_rss, _rss(controller.pid))
            cpu_seconds = max(cpu_seconds, _cpu_seconds(controller.pid))
        time.sleep(0.2)
    finished = time.monotonic()
    plane_cpu = sum(_cpu_seconds(pid) for pid in control_plane) - plane_cpu_before
    watch.stop.set()
    if controller is not None:
        controller.terminate()
        try:
            controller.wait(30)
        except subprocess.TimeoutExpired:
            controller.kill()
            controller.wait()
    with watch.lock:
        latencies = sorted(watch.seen[n] - created[n] for n in created if n in watch.seen)
    pods = len(latencies)
    return {
        "scenario": name,
        "objects": count * len(manifests),
        "pods": pods,
        "complete": pods == count * len(manifests),
        "create_seconds": created_all - started,
        "all_pods_seconds": finished - started,
        "objects_per_second": pods / (finished - started),
        "p50_create_to_pod_seconds": latencies[len(latencies) // 2] if latencies else None,
        "p99_create_to_pod_seconds": latencies[int(len(latencies) * 0.99) - 1] if latencies else None,
        "mean_create_to_pod_seconds": statistics.fmean(latencies) if latencies else None,
        "controller_peak_rss_mib": peak_rss / 2**20 if controller_command else None,
        "controller_cpu_seconds": cpu_seconds if controller_command else None,
        "control_plane_cpu_seconds": plane_cpu,
    }


def _cpu_seconds(pid: int) -> float:
    try:
        process = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0.0


def _rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def markdown(results: list[dict], count: int, kwok_nodes: int, wall_seconds: float) -> str:
    direct = next((r for r in results if r["scenario"] == "direct"), None)
    peer = next((r for r in results if r["scenario"] == "agent-sandbox"), None)
    where = f"{kwok_nodes} kwok-simulated nodes (pods bound, Running and Ready)" if kwok_nodes else "no node (pods stay Pending)"
    rows = [
        f"# Sandbox controller scale: {count} objects on one local control plane, {where}",
        "",
        f"Wall time of the whole run (environment, {'nodes, ' if kwok_nodes else ''}every scenario): {wall_seconds / 60:.1f} min.",
        "",
        "| scenario | pods | objects/s | × direct | × agent-sandbox | p50 create→pod s | p99 create→pod s "
        "| controller peak RSS MiB | controller CPU s | API server + etcd CPU s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['objects_per_second'] / direct['objects_per_second']:.2f}" if direct else "-"
        versus = f"{r['objects_per_second'] / peer['objects_per_second']:.2f}" if peer else "-"
        rss = f"{r['controller_peak_rss_mib']:.0f}" if r["controller_peak_rss_mib"] else "-"
        cpu = f"{r['controller_cpu_seconds']:.0f}" if r.get("controller_cpu_seconds") else "-"
        p50 = f"{r['p50_create_to_pod_seconds']:.2f}" if r["p50_create_to_pod_seconds"] is not None else "-"
        p99 = f"{r['p99_create_to_pod_seconds']:.2f}" if r["p99_create_to_pod_seconds"] is not None else "-"
        rows.append(f"| {r['scenario']} | {r['pods']}/{r['objects']} | {r['objects_per_second']:.1f} | {ratio} | {versus} | "
                    f"{p50} | {p99} | {rss} | {cpu} | {r['control_plane_cpu_seconds']:.0f} |")
    return "\n".join(rows) + "\n"


def build_agent_sandbox(source: Path) -> Path:
    """kubernetes-sigs/agent-sandbox's controller from a checkout, built as its Dockerfile does (static,
    stripped), into the cache under a digest of its Go sources: rebuilt only when they change."""
    digest = hashlib.sha256()
    for path in sorted(source.rglob("*")):
        if path.is_file() and (path.suffix == ".go" or path.name in ("go.mod", "go.sum")):
            digest.update(str(path.relative_to(source)).encode() + b"\0" + path.read_bytes())
    target = bin_dir().parent / f"agent-sandbox-controller-{digest.hexdigest()[:16]}"
    if not target.exists():
        print(f"building agent-sandbox's controller from {source} into {target}")
        partial = target.with_name(target.name + ".partial")
        subprocess.run(["go", "build", "-ldflags", "-s -w", "-o", str(partial), "./cmd/agent-sandbox-controller"],
                       cwd=source, env={**os.environ, "CGO_ENABLED": "0"}, check=True)
        partial.replace(target)
    return target


def kwok_node(index: int) -> dict:
    """A Node kwok plays the kubelet of (capacity.KWOK_NODE_ANNOTATION), with room for any scenario's pods."""
    key, value = capacity.KWOK_NODE_ANNOTATION.split("=")
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"kwok-node-{index}", "annotations": {key: value}, "labels": {"type": "kwok"}},
            "status": {"capacity": KWOK_NODE_CAPACITY, "allocatable": KWOK_NODE_CAPACITY}}


def start_kwok_nodes(devenv, api_client, nodes: int, timeout: float = 300) -> float:
    """kube-scheduler, kwok and `nodes` simulated nodes; returns once every node is Ready (seconds taken)."""
    started = time.monotonic()
    ensure_go_program("kwok")
    devenv.start_scheduler()
    devenv.start_kwok()
    core = kubernetes.client.CoreV1Api(api_client)
    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(lambda i: core.create_node(kwok_node(i)), range(nodes)))
    while time.monotonic() - started < timeout:
        ready = sum(1 for node in core.list_node(label_selector="type=kwok").items
                    if any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []))
        if ready == nodes:
            return time.monotonic() - started
        time.sleep(2)
    raise RuntimeError(f"only {ready} of {nodes} kwok nodes Ready after {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900, help="per scenario, seconds")
    parser.add_argument("--kwok-nodes", type=int, default=0, help="simulated nodes the pods are bound to (0: none)")
    parser.add_argument("--agent-sandbox-source", type=Path, help="a kubernetes-sigs/agent-sandbox checkout: "
                        "its controller runs as the scenario `agent-sandbox`")
    parser.add_argument("--only", action="append", metavar="SCENARIO", help="run only these scenarios; may repeat")
    parser.add_argument("--scenario", action="append", metavar="NAME=MANIFEST_DIR=COMMAND",
                        help="an extra controller to measure: its manifests and the command that runs it "
                             "(KUBECONFIG is set for it); may repeat")
    parser.add_argument("--crds", action="append", default=[], metavar="DIR", help="extra CRDs to install first; may repeat")
    args = parser.parse_args()
    wall_started = time.monotonic()
    scenarios = [
        ("direct", HERE / "manifests" / "direct", None),
        ("agentkube", HERE / "manifests" / "agentkube",
         [sys.executable, "-m", "agentkube", "operator", "run", "--metrics-port=0", "--liveness-port=0", "--peering="]),
    ]
    crds = [REPO / "crds", *args.crds]
    if args.agent_sandbox_source:
        binary = build_agent_sandbox(args.agent_sandbox_source.resolve())
        crds.append(args.agent_sandbox_source / "helm" / "crds")
        scenarios.append(("agent-sandbox", HERE / "manifests" / "agent-sandbox", [str(binary), *AGENT_SANDBOX_FLAGS]))
    for extra in args.scenario or []:
        name, directory, command = extra.split("=", 2)
        scenarios.append((name, Path(directory), shlex.split(command)))
    if args.only:
        scenarios = [s for s in scenarios if s[0] in args.only]

    results = []
    # Each scenario on a control plane (and simulated nodes) of its own: every controller starts from an
    # equally empty store, and nothing has to be deleted between them (10,000 pods' namespace took longer
    # to delete than to fill on this machine).
    for name, directory, command in scenarios:
        with temporary_env(with_prometheus=False) as devenv:
            env = devenv.environ()
            for crd_directory in crds:
                subprocess.run([str(bin_dir() / "kubectl"), "apply", "--server-side", "-f", str(crd_directory)], env=env,
                               check=True, capture_output=True)
            api_client = kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))
            if args.kwok_nodes:
                print(f"{args.kwok_nodes} kwok nodes Ready in {start_kwok_nodes(devenv, api_client, args.kwok_nodes):.0f} s")
            plane = [r.pid for r in devenv.processes if r.name in ("kube-apiserver", "etcd")]
            result = run_scenario(name, api_client, _load_manifests(directory), args.count, f"bench-{name}", command, env,
                                  args.timeout, plane)
        print(json.dumps(result), flush=True)
        results.append(result)
    wall_seconds = time.monotonic() - wall_started
    stem = "sandbox_scale_kwok" if args.kwok_nodes else "sandbox_scale"
    summary = {"count": args.count, "kwok_nodes": args.kwok_nodes, "wall_seconds": wall_seconds, "results": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(results, args.count, args.kwok_nodes, wall_seconds))
    print(markdown(results, args.count, args.kwok_nodes, wall_seconds))


if __name__ == "__main__":
    main()
