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
    of it is committed), with its CRDs;
  * `agentkube-N-shards` (with `--shards N`): N operator processes, `--shard I/N` each (one replica per shard:
    a standby does no work until it takes over), reconciling the namespaces that hash to them.

The objects are spread round-robin over `--namespaces K` namespaces (the same ones in every scenario), so
that a sharded operator has namespaces to divide; with `--shards N` they are chosen so that each shard owns
K/N of them (`shard_of` decides, and with a few namespaces chance could give one shard most of them).

Without nodes the pods stay Pending (nothing schedules them): the run measures the controllers alone. With
`--kwok-nodes N`, kube-scheduler and kwok (the devenv's, as `agentkube dev up --with-capacity` runs it) bind
the pods to N simulated nodes and play them Running and Ready, so every pod also sends the controller the
events of a real one.

    .venv/bin/python bench/sandbox_scale.py --count 1000 --agent-sandbox-source DIR
    .venv/bin/python bench/sandbox_scale.py --count 10000 --kwok-nodes 200 --agent-sandbox-source DIR
    .venv/bin/python bench/sandbox_scale.py --count 1000 --shards 2 --agent-sandbox-source DIR

Writes bench/results/sandbox_scale.{json,md} (with `--kwok-nodes`: sandbox_scale_kwok.{json,md}; with
`--shards`: sandbox_scale_shards[_kwok].{json,md}).
"""

import argparse
import concurrent.futures
import dataclasses
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
import urllib3
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agentkube.devenv import capacity, process, temporary_env
from agentkube.devenv.install import ensure_go_program
from agentkube.devenv.versions import bin_dir
from agentkube.operator.shards import shard_of

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


def bench_namespaces(count: int, shards: int) -> list[str]:
    """`count` namespace names, `count / shards` of them owned by each shard."""
    per_shard = -(-count // shards)
    owned: dict[int, list[str]] = {shard: [] for shard in range(shards)}
    index = 0
    while sum(map(len, owned.values())) < count:
        name = f"bench-{index}"
        if len(owned[shard_of(name, shards)]) < per_shard:
            owned[shard_of(name, shards)].append(name)
        index += 1
    return sorted((name for names in owned.values() for name in names), key=lambda n: int(n.split("-")[1]))[:count]


class PodWatch:
    """Records when the pod owned by each named object first appears (names are unique across namespaces)."""

    def __init__(self, api_client, namespaces: list[str]):
        self.core = kubernetes.client.CoreV1Api(api_client)
        self.namespaces = set(namespaces)
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # One watch resumed from the last resourceVersion it saw (bookmarks keep that fresh), not a watch
        # started afresh every few seconds: a watch without a resourceVersion begins with an ADDED event of
        # every existing pod, so restarting it every 5 s (as this harness did until December 2026) cost the
        # API server and this process work that grew with the pods made so far, and most for the controller
        # that made pods soonest. Events are read as JSON, without the client's models.
        version: str | None = None
        while not self.stop.is_set():
            arguments = {"watch": True, "timeout_seconds": 30, "allow_watch_bookmarks": True, "_preload_content": False}
            if version:
                arguments["resource_version"] = version
            try:
                response = self.core.list_pod_for_all_namespaces(**arguments)
                try:
                    for line in response:
                        event = json.loads(line)
                        pod = event["object"]
                        if event["type"] == "ERROR":  # 410: the resourceVersion is too old; list afresh
                            print(f"pod watch restarted after {pod.get('code')} {pod.get('reason')}")
                            version = None
                            break
                        version = pod["metadata"].get("resourceVersion") or version
                        if event["type"] == "BOOKMARK" or pod["metadata"].get("namespace") not in self.namespaces:
                            continue
                        owners = pod["metadata"].get("ownerReferences") or []
                        name = owners[0]["name"] if owners else pod["metadata"]["name"]
                        with self.lock:
                            self.seen.setdefault(name, time.monotonic())
                        if self.stop.is_set():
                            break
                finally:
                    response.release_conn()
            except kubernetes.client.ApiException as error:
                # A busy API server can refuse to resume at a resourceVersion its cache has not reached
                # (504 "Too large resource version"): list afresh. Pods seen before keep their first time;
                # the others are timed by the new list.
                print(f"pod watch restarted after {error.status} {error.reason}")
                version = None
            except urllib3.exceptions.HTTPError as error:  # the stream cut (its control plane stopping, at the end)
                if not self.stop.is_set():
                    print(f"pod watch resumed after {error!r}")

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def run_scenario(name: str, api_client, manifests: list[dict], count: int, namespaces: list[str],
                 controller_commands: list[list[str]], env: dict[str, str], timeout: float,
                 control_plane: list[int] = (), controller_manager: list[int] = ()) -> dict:
    """`controller_commands`: the controller's processes (none: the harness alone; several: shards).
    `control_plane`: the pids of kube-apiserver and etcd, whose CPU time during the scenario is recorded
    (the work a controller's requests cost the API server); `controller_manager`: kube-controller-manager's,
    whose controllers (endpoints, EndpointSlices, garbage collection) work on what a sandbox controller makes."""
    core = kubernetes.client.CoreV1Api(api_client)
    for namespace in namespaces:
        core.create_namespace({"metadata": {"name": namespace}})
    # Pods are refused until the controller manager has made the namespace's default service account.
    for namespace in namespaces:
        while not core.list_namespaced_service_account(namespace, field_selector="metadata.name=default").items:
            time.sleep(0.1)
    dynamic = kubernetes.dynamic.DynamicClient(api_client)
    controllers = []
    for i, command in enumerate(controller_commands):
        log = open(Path(tempfile.gettempdir()) / f"sandbox_scale-{os.getpid()}-{name}-{i}.log", "w")
        # It dies with the harness, even a harness killed outright (its control plane does too).
        controllers.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            preexec_fn=process.die_with_parent))
    if controllers:
        time.sleep(3)  # let them log in and start watching before the clock starts
    # Each controller's memory at its peak of resident memory: resident, anonymous, file-backed (KiB), threads.
    peaks = [Memory() for _ in controllers]
    cpu_seconds = [0.0] * len(controllers)
    sampling = threading.Event()

    def sample() -> None:  # from the first create on: a controller's peak can come while the harness creates
        while not sampling.wait(0.2):
            for i, controller in enumerate(controllers):
                peaks[i] = max(peaks[i], _memory(controller.pid))
                cpu_seconds[i] = max(cpu_seconds[i], _cpu_seconds(controller.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    load_before = os.getloadavg()
    watch = PodWatch(api_client, namespaces)
    watch.thread.start()
    created: dict[str, float] = {}

    def create(index: int) -> None:
        for manifest in manifests:
            body = json.loads(json.dumps(manifest))
            body["metadata"]["name"] = f"{body['metadata']['name']}-{index}"
            resource = dynamic.resources.get(api_version=body["apiVersion"], kind=body["kind"])
            resource.create(body=body, namespace=namespaces[index % len(namespaces)])
            created[body["metadata"]["name"]] = time.monotonic()

    plane_cpu_before = sum(_cpu_seconds(pid) for pid in control_plane)
    manager_cpu_before = sum(_cpu_seconds(pid) for pid in controller_manager)
    requests_before = api_server_requests(api_client)
    started = time.monotonic()
    sampler.start()
    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, range(count)))
    created_all = time.monotonic()
    while watch.count() < count * len(manifests) and time.monotonic() - started < timeout:
        time.sleep(0.2)
    finished = time.monotonic()
    sampling.set()
    sampler.join()
    load_after = os.getloadavg()
    plane_cpu = sum(_cpu_seconds(pid) for pid in control_plane) - plane_cpu_before
    manager_cpu = sum(_cpu_seconds(pid) for pid in controller_manager) - manager_cpu_before
    requests = requests_per_object(requests_before, api_server_requests(api_client), count * len(manifests))
    watch.stop.set()
    for controller in controllers:
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
        "namespaces": len(namespaces),
        "controller_processes": len(controllers),
        # Summed over the processes (an upper bound of their peak together), and each process's own peak.
        "controller_peak_rss_mib": sum(m.rss for m in peaks) / 2**10 if controllers else None,
        "controller_peak_rss_mib_per_process": [m.rss / 2**10 for m in peaks],
        # At each process's peak: anonymous memory (heaps, Python objects, stacks) and file-backed pages (the
        # binary and its shared libraries), MiB, and its threads.
        "controller_peak_anon_mib_per_process": [m.anon / 2**10 for m in peaks],
        "controller_peak_file_mib_per_process": [m.file / 2**10 for m in peaks],
        "controller_threads_at_peak_per_process": [m.threads for m in peaks],
        "controller_cpu_seconds": sum(cpu_seconds) if controllers else None,
        "controller_cpu_seconds_per_process": cpu_seconds,
        "control_plane_cpu_seconds": plane_cpu,
        "controller_manager_cpu_seconds": manager_cpu,
        # The machine is shared: the 1-minute load average as the scenario started and as it ended.
        "load_average_1m": [load_before[0], load_after[0]],
        # Everything the API server served during the scenario (the harness's own creates and pod watch
        # included, alike in every scenario), per object.
        "api_requests_per_object": requests["count"],
        "api_request_seconds_per_object": requests["seconds"],
        "api_flowcontrol": requests["flowcontrol"],
    }


def api_server_requests(api_client) -> dict[str, dict[str, float]]:
    """The API server's own count and summed duration of the requests it served so far, by
    "VERB resource[/subresource]" (its /metrics: `apiserver_request_total`, `apiserver_request_duration_seconds`;
    WATCH and its long-running kin are counted, their duration is not meaningful), and the requests API
    Priority and Fairness turned away or queued (`apiserver_flowcontrol_*`), and the watchers it dropped for
    falling behind (`apiserver_terminated_watchers_total`: each such client lists again)."""
    headers = {**api_client.default_headers, "Accept": "text/plain"}
    api_client.update_params_for_auth(headers, [], ["BearerToken"], "/metrics", "GET", None)
    text = api_client.call_api("GET", api_client.configuration.host + "/metrics", header_params=headers).read().decode()
    counts: dict[str, float] = {}
    seconds: dict[str, float] = {}
    flowcontrol: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            key = f"{labels.get('verb', '')} {labels.get('resource', '')}" + (
                f"/{labels['subresource']}" if labels.get("subresource") else "")
            if sample.name == "apiserver_request_total":
                counts[key] = counts.get(key, 0) + sample.value
            elif sample.name == "apiserver_request_duration_seconds_sum":
                seconds[key] = seconds.get(key, 0) + sample.value
            elif sample.name in ("apiserver_flowcontrol_rejected_requests_total",
                                 "apiserver_flowcontrol_request_wait_duration_seconds_sum",
                                 "apiserver_terminated_watchers_total"):
                flowcontrol[sample.name] = flowcontrol.get(sample.name, 0) + sample.value
    return {"count": counts, "seconds": seconds, "flowcontrol": flowcontrol}


def requests_per_object(before: dict, after: dict, objects: int) -> dict[str, dict[str, float]]:
    """What a scenario cost the API server, per object: requests and seconds of serving them by verb and
    resource (only those that grew), and the APF counters' growth (in total, not per object)."""
    per = {"count": {}, "seconds": {}}
    for kind in per:
        for key, value in after[kind].items():
            grown = value - before[kind].get(key, 0)
            if grown > 0:
                per[kind][key] = grown / max(objects, 1)
    per["flowcontrol"] = {k: v - before["flowcontrol"].get(k, 0) for k, v in after["flowcontrol"].items()}
    return per


def _cpu_seconds(pid: int) -> float:
    try:
        process = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0.0


@dataclasses.dataclass(frozen=True, order=True)
class Memory:
    """A process tree's resident memory (KiB; ordered by it), its anonymous and file-backed parts, its threads."""
    rss: int = 0
    anon: int = 0
    file: int = 0
    threads: int = 0


def _memory(pid: int) -> Memory:
    total = Memory()
    try:
        process = psutil.Process(pid)
        tree = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for member in tree:
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{member.pid}/status").read_text().splitlines())
        except (FileNotFoundError, ProcessLookupError):
            continue
        kib = {name: int(fields[name].split()[0]) for name in ("VmRSS", "RssAnon", "RssFile")}
        total = Memory(total.rss + kib["VmRSS"], total.anon + kib["RssAnon"], total.file + kib["RssFile"],
                       total.threads + int(fields["Threads"]))
    return total


def markdown(results: list[dict], count: int, kwok_nodes: int, wall_seconds: float, namespaces: int = 1,
             concurrently: bool = False) -> str:
    direct = next((r for r in results if r["scenario"] == "direct"), None)
    peer = next((r for r in results if r["scenario"] == "agent-sandbox"), None)
    where = f"{kwok_nodes} kwok-simulated nodes (pods bound, Running and Ready)" if kwok_nodes else "no node (pods stay Pending)"
    rows = [
        f"# Sandbox controller scale: {count} objects in {namespaces} namespace{'s' if namespaces > 1 else ''} "
        f"on one local control plane, {where}",
        "",
        f"Wall time of the whole run (environment, {'nodes, ' if kwok_nodes else ''}every scenario): {wall_seconds / 60:.1f} min. "
        f"Machine: {os.cpu_count()} CPUs, shared; load average (1 min) at each scenario's start → end in the last column. "
        + ("The scenarios ran at the same time, each on its own control plane." if concurrently
           else "The scenarios ran one after another."),
        "",
        "| scenario | pods | objects/s | × direct | × agent-sandbox | p50 create→pod s | p99 create→pod s "
        "| controller peak RSS MiB (per process) | controller CPU s | API server + etcd CPU s | controller-manager CPU s "
        "| load avg |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r['objects_per_second'] / direct['objects_per_second']:.2f}" if direct else "-"
        versus = f"{r['objects_per_second'] / peer['objects_per_second']:.2f}" if peer else "-"
        rss = f"{r['controller_peak_rss_mib']:.0f}" if r["controller_peak_rss_mib"] else "-"
        if len(r.get("controller_peak_rss_mib_per_process") or []) > 1:
            rss += " (" + " + ".join(f"{m:.0f}" for m in r["controller_peak_rss_mib_per_process"]) + ")"
        load = " → ".join(f"{x:.1f}" for x in r["load_average_1m"]) if r.get("load_average_1m") else "-"
        cpu = f"{r['controller_cpu_seconds']:.0f}" if r.get("controller_cpu_seconds") else "-"
        p50 = f"{r['p50_create_to_pod_seconds']:.2f}" if r["p50_create_to_pod_seconds"] is not None else "-"
        p99 = f"{r['p99_create_to_pod_seconds']:.2f}" if r["p99_create_to_pod_seconds"] is not None else "-"
        rows.append(f"| {r['scenario']} | {r['pods']}/{r['objects']} | {r['objects_per_second']:.1f} | {ratio} | {versus} | "
                    f"{p50} | {p99} | {rss} | {cpu} | {r['control_plane_cpu_seconds']:.0f} | "
                    f"{r.get('controller_manager_cpu_seconds', 0):.0f} | {load} |")
    return "\n".join(rows + memory_table(results) + request_table(results)) + "\n"


def memory_table(results: list[dict]) -> list[str]:
    """Each controller process at its peak of resident memory: anonymous and file-backed parts, threads, and the
    ratio of its peak to agent-sandbox's (when that ran)."""
    peer = next((r for r in results if r["scenario"] == "agent-sandbox"), None)
    rows = ["", "Controller memory at each process's peak of resident memory (MiB): anonymous (heaps, objects, stacks) "
            "and file-backed (binary and shared libraries):", "",
            "| scenario | process | peak RSS | anonymous | file-backed | threads | RSS × agent-sandbox |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        anon = r.get("controller_peak_anon_mib_per_process") or []
        for i, rss in enumerate(r.get("controller_peak_rss_mib_per_process") or []):
            versus = f"{rss / peer['controller_peak_rss_mib']:.2f}" if peer and peer["controller_peak_rss_mib"] else "-"
            rows.append(f"| {r['scenario']} | {i} | {rss:.0f} | {anon[i]:.0f} | {r['controller_peak_file_mib_per_process'][i]:.0f} | "
                        f"{r['controller_threads_at_peak_per_process'][i]} | {versus} |" if anon else
                        f"| {r['scenario']} | {i} | {rss:.0f} | - | - | - | {versus} |")
    return rows


def request_table(results: list[dict], floor: float = 0.02) -> list[str]:
    """API requests per object by verb and resource, scenario beside scenario (those at `floor` or more in
    some scenario), with the API server's seconds spent serving each (WATCH excluded: it lasts as long as
    its client keeps it open)."""
    measured = [r for r in results if "api_requests_per_object" in r]
    if not measured:
        return []
    keys = sorted({k for r in measured for k, v in r["api_requests_per_object"].items() if v >= floor},
                  key=lambda k: -max(r["api_requests_per_object"].get(k, 0) for r in measured))
    rows = ["", "API requests per object by verb and resource, as the API server counted them during each scenario "
            "(the harness's creates and pod watch included), and its ms of serving them per object:", "",
            "| verb resource | " + " | ".join(r["scenario"] for r in measured) + " |",
            "|---|" + "---:|" * len(measured)]
    for key in keys:
        cells = []
        for r in measured:
            count = r["api_requests_per_object"].get(key, 0)
            ms = 1000 * r["api_request_seconds_per_object"].get(key, 0)
            cells.append(f"{count:.2f}" + (f" ({ms:.1f} ms)" if count and not key.startswith("WATCH") else ""))
        rows.append(f"| {key} | " + " | ".join(cells) + " |")
    totals = [sum(r["api_requests_per_object"].values()) for r in measured]
    rows.append("| all | " + " | ".join(f"{t:.2f}" for t in totals) + " |")
    rows.append("| APF: seconds requests waited in queues / rejected (in all) | " + " | ".join(
        f"{r['api_flowcontrol'].get('apiserver_flowcontrol_request_wait_duration_seconds_sum', 0):.1f} / "
        f"{r['api_flowcontrol'].get('apiserver_flowcontrol_rejected_requests_total', 0):.0f}" for r in measured) + " |")
    rows.append("| watchers the API server dropped for falling behind (in all) | " + " | ".join(
        f"{r['api_flowcontrol'].get('apiserver_terminated_watchers_total', 0):.0f}" for r in measured) + " |")
    return rows


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
    parser.add_argument("--shards", type=int, default=0, help="also run agentkube as this many shards (scenario "
                        "agentkube-N-shards), beside one")
    parser.add_argument("--concurrently", action="store_true", help="run the scenarios at the same time (each on "
                        "its own control plane) instead of one after another")
    parser.add_argument("--output", metavar="STEM", help="write bench/results/STEM.{json,md} (default: by the options)")
    parser.add_argument("--namespaces", type=int, help="namespaces the objects are spread over (default: 1; "
                        "with --shards N, 4 per shard)")
    args = parser.parse_args()
    wall_started = time.monotonic()
    namespace_count = args.namespaces or (4 * args.shards if args.shards > 1 else 1)
    namespaces = bench_namespaces(namespace_count, max(args.shards, 1))
    operator = [sys.executable, "-m", "agentkube", "operator", "run", "--metrics-port=0", "--liveness-port=0", "--peering="]
    scenarios = [
        ("direct", HERE / "manifests" / "direct", []),
        ("agentkube", HERE / "manifests" / "agentkube", [operator]),
    ]
    if args.shards > 1:
        scenarios.append((f"agentkube-{args.shards}-shards", HERE / "manifests" / "agentkube",
                          [[*operator, f"--shard={i}/{args.shards}"] for i in range(args.shards)]))
    crds = [REPO / "crds", *args.crds]
    if args.agent_sandbox_source:
        binary = build_agent_sandbox(args.agent_sandbox_source.resolve())
        crds.append(args.agent_sandbox_source / "helm" / "crds")
        scenarios.append(("agent-sandbox", HERE / "manifests" / "agent-sandbox", [[str(binary), *AGENT_SANDBOX_FLAGS]]))
    for extra in args.scenario or []:
        name, directory, command = extra.split("=", 2)
        scenarios.append((name, Path(directory), [shlex.split(command)]))
    if args.only:
        scenarios = [s for s in scenarios if s[0] in args.only]

    # Each scenario on a control plane (and simulated nodes) of its own: every controller starts from an
    # equally empty store, and nothing has to be deleted between them (10,000 pods' namespace took longer
    # to delete than to fill on this machine).
    def run_alone(name: str, directory: Path, commands: list[list[str]]) -> dict:
        with temporary_env(with_prometheus=False) as devenv:
            env = devenv.environ()
            for crd_directory in crds:
                subprocess.run([str(bin_dir() / "kubectl"), "apply", "--server-side", "-f", str(crd_directory)], env=env,
                               check=True, capture_output=True)
            api_client = kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))
            if args.kwok_nodes:
                print(f"{name}: {args.kwok_nodes} kwok nodes Ready in "
                      f"{start_kwok_nodes(devenv, api_client, args.kwok_nodes):.0f} s", flush=True)
            plane = [r.pid for r in devenv.processes if r.name in ("kube-apiserver", "etcd")]
            manager = [r.pid for r in devenv.processes if r.name == "kube-controller-manager"]
            result = run_scenario(name, api_client, _load_manifests(directory), args.count, namespaces, commands, env,
                                  args.timeout, plane, manager)
        print(json.dumps(result), flush=True)
        return result

    if args.concurrently:
        # All scenarios at once, each on its own control plane: on a machine that others load unevenly over
        # the tens of minutes a large run takes, they then share the same conditions (and each other's
        # load), which back-to-back scenarios never do.
        with concurrent.futures.ThreadPoolExecutor(len(scenarios)) as runners:
            results = list(runners.map(lambda scenario: run_alone(*scenario), scenarios))
    else:
        results = [run_alone(*scenario) for scenario in scenarios]
    wall_seconds = time.monotonic() - wall_started
    stem = args.output or "sandbox_scale" + ("_shards" if args.shards > 1 else "") + ("_kwok" if args.kwok_nodes else "")
    summary = {"count": args.count, "kwok_nodes": args.kwok_nodes, "shards": args.shards, "namespaces": namespaces,
               "concurrently": args.concurrently,
               "cpus": os.cpu_count(), "wall_seconds": wall_seconds, "results": results}
    table = markdown(results, args.count, args.kwok_nodes, wall_seconds, len(namespaces), args.concurrently)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
