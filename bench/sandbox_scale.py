"""How fast a sandbox controller turns N sandbox objects into N pods, on one local control plane.

The harness knows nothing of agentkube: it creates the objects in a directory of manifests N times
(`metadata.name` gets a `-<i>` suffix), watches pods whose first owner reference names one of them, and
records, per object, the time from its create call returning to its pod appearing in the watch. So any
controller can be measured by the same harness on the same control plane (`--controller-command`, e.g.
kubernetes-sigs/agent-sandbox's Go controller with its own manifests).

Side by side in one run:
  * `direct`: the harness creates the pods itself (the API server's own ceiling for this client);
  * `agentkube`: AgentSandbox objects reconciled by `agentkube operator run`.

    .venv/bin/python bench/sandbox_scale.py --count 1000

Writes bench/results/sandbox_scale.{json,md}.
"""

import argparse
import concurrent.futures
import json
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

from agentkube.devenv import temporary_env
from agentkube.devenv.versions import bin_dir

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
REPO = HERE.parent
CREATE_THREADS = 8


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
            for event in watch.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                owners = event["object"].metadata.owner_references or []
                name = owners[0].name if owners else event["object"].metadata.name
                with self.lock:
                    self.seen.setdefault(name, time.monotonic())
                if self.stop.is_set():
                    break

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def run_scenario(name: str, api_client, manifests: list[dict], count: int, namespace: str,
                 controller_command: list[str] | None, env: dict[str, str], timeout: float) -> dict:
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
        controller = subprocess.Popen(controller_command, env=env, stdout=log, stderr=subprocess.STDOUT)
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

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, range(count)))
    created_all = time.monotonic()
    while watch.count() < count * len(manifests) and time.monotonic() - started < timeout:
        if controller is not None:
            peak_rss = max(peak_rss, _rss(controller.pid))
        time.sleep(0.2)
    finished = time.monotonic()
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
    }


def _rss(pid: int) -> int:
    try:
        process = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def markdown(results: list[dict], count: int) -> str:
    direct = next((r for r in results if r["scenario"] == "direct"), None)
    rows = [
        f"# Sandbox controller scale: {count} objects on one local control plane",
        "",
        "| scenario | pods | objects/s | × direct | p50 create→pod s | p99 create→pod s | controller peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['objects_per_second'] / direct['objects_per_second']:.2f}" if direct else "-"
        rss = f"{r['controller_peak_rss_mib']:.0f}" if r["controller_peak_rss_mib"] else "-"
        rows.append(f"| {r['scenario']} | {r['pods']}/{r['objects']} | {r['objects_per_second']:.1f} | {ratio} | "
                    f"{r['p50_create_to_pod_seconds']:.2f} | {r['p99_create_to_pod_seconds']:.2f} | {rss} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--scenario", action="append", metavar="NAME=MANIFEST_DIR=COMMAND",
                        help="an extra controller to measure: its manifests and the command that runs it "
                             "(KUBECONFIG is set for it); may repeat")
    parser.add_argument("--crds", action="append", default=[], metavar="DIR", help="extra CRDs to install first; may repeat")
    args = parser.parse_args()
    scenarios = [
        ("direct", HERE / "manifests" / "direct", None),
        ("agentkube", HERE / "manifests" / "agentkube",
         [sys.executable, "-m", "agentkube", "operator", "run", "--metrics-port=0", "--liveness-port=0", "--peering="]),
    ]
    for extra in args.scenario or []:
        name, directory, command = extra.split("=", 2)
        scenarios.append((name, Path(directory), shlex.split(command)))

    results = []
    with temporary_env(with_prometheus=False) as devenv:
        env = devenv.environ()
        for crd_directory in [REPO / "crds", *args.crds]:
            subprocess.run([str(bin_dir() / "kubectl"), "apply", "--server-side", "-f", str(crd_directory)], env=env, check=True,
                           capture_output=True)
        api_client = kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))
        for name, directory, command in scenarios:
            result = run_scenario(name, api_client, _load_manifests(directory), args.count, f"bench-{name}", command, env, args.timeout)
            print(json.dumps(result))
            results.append(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sandbox_scale.json").write_text(json.dumps({"count": args.count, "results": results}, indent=2) + "\n")
    (RESULTS / "sandbox_scale.md").write_text(markdown(results, args.count))
    print(markdown(results, args.count))


if __name__ == "__main__":
    main()
