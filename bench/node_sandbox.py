"""A sandbox on the real local node, timed end to end, side by side in one run:

- `dev up` with the node against `dev up` without it (fresh state each time, images and binaries cached);
- `kubectl apply` of an AgentSandbox to Ready (phase Running) and to its first SDK answer: the first
  sandbox on a fresh node, the first after the sandbox image is removed from containerd (so its import
  is part of the time — no registry here), and with the image present and used before;
- one tool call's round trip through the SDK into the sandbox pod (`true`), beside the same command
  started directly on the host.

Writes bench/results/node_sandbox.{json,md}.

    .venv/bin/python bench/node_sandbox.py [--runs 3] [--sandboxes 5] [--calls 200]
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import report

from agentkube.client import Sandbox
from agentkube.devenv import images, localnode, node, temporary_env
from agentkube.devenv.versions import KUBERNETES_VERSION, bin_dir
from agentkube.operator import crds

NAMESPACE = "default"
WAIT_SECONDS = 180.0


def _dev_up(with_node: bool, runs: int) -> tuple[list[float], dict[str, float]]:
    totals, components = [], []
    for _ in range(runs):
        env = temporary_env(with_prometheus=False, with_node=with_node)
        try:
            started = time.monotonic()
            env.up()
            totals.append(time.monotonic() - started)
            components.append(dict(env.startup_seconds))
        finally:
            env.down()
    return totals, {name: statistics.median(c[name] for c in components) for name in components[0]}


def _sandbox_manifest(name: str, suspend: bool = False) -> str:
    return json.dumps({"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox", "metadata": {"name": name},
                       "spec": {"template": {"image": images.SANDBOX_IMAGE, "resources": {
                           "requests": {"memory": "64Mi", "cpu": "50m"}, "limits": {"memory": "512Mi", "cpu": "1"}}},
                           "lifecycle": {"suspend": suspend}}})


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {WAIT_SECONDS:.0f}s")
        time.sleep(0.05)


def _sdk_answers(client: Sandbox) -> bool:
    try:
        client.status()
        return True
    except (OSError, RuntimeError):
        return False


def _apply_to_ready(kubectl, name: str) -> tuple[float, float]:
    """Seconds from `kubectl apply` to phase Running, and to the SDK's first answer."""
    started = time.monotonic()
    kubectl("apply", "-f", "-", input=_sandbox_manifest(name))
    _until(lambda: kubectl("get", "agentsandbox", name, "-o", "jsonpath={.status.phase}").stdout == "Running", f"{name} Running")
    ready = time.monotonic() - started
    client = Sandbox(name, NAMESPACE)
    _until(lambda: _sdk_answers(client), f"{name} answering the SDK")
    return ready, time.monotonic() - started


def _delete_all(kubectl) -> None:
    kubectl("delete", "agentsandbox", "--all", "--wait=true")
    _until(lambda: not kubectl("get", "pods", "-o", "name").stdout.strip(), "sandbox pods gone")


def _round_trips(client: Sandbox, calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        client.run(["true"])
        seconds.append(time.perf_counter() - started)
    return seconds


def _host_spawns(calls: int) -> list[float]:
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run(["true"], check=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def _summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)  # p95 by nearest rank: with few runs, the largest
    return {"median": statistics.median(ordered), "p95": ordered[math.ceil(0.95 * len(ordered)) - 1], "n": len(ordered)}


def measure(runs: int, sandboxes: int, calls: int) -> dict:
    up_plain, _ = _dev_up(False, runs)
    up_node, node_components = _dev_up(True, runs)

    env = temporary_env(with_prometheus=False, with_node=True)
    operator = None
    try:
        env.up()

        def kubectl(*args, input=None):
            return subprocess.run([str(bin_dir() / "kubectl"), "-n", NAMESPACE, *args], env=env.environ(), input=input,
                                  capture_output=True, text=True, check=True)

        kubectl("apply", "--server-side", "-f", str(crds.CRD_DIRECTORY))
        kubectl("wait", "--for=condition=Established", f"crd/{crds.AGENT_SANDBOX.crd_name}")
        operator = subprocess.Popen([sys.executable, "-m", "agentkube", "operator", "run", "--metrics-port=0",
                                     "--liveness-port=0"], env=env.environ(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The operator is watching once it has handled a suspended sandbox (no pod): from here on the
        # clock measures the node, not the operator's start.
        kubectl("apply", "-f", "-", input=_sandbox_manifest("probe", suspend=True))
        _until(lambda: kubectl("get", "agentsandbox", "probe", "-o", "jsonpath={.status.phase}").stdout == "Suspended",
               "the operator handling a sandbox")
        first_ready, first_sdk = _apply_to_ready(kubectl, "first")
        warm = []
        for i in range(sandboxes):  # one at a time, each on a node as loaded as the last
            _delete_all(kubectl)
            warm.append(_apply_to_ready(kubectl, f"warm-{i}"))

        # Without the image in containerd: what a node that has never seen it pays (its import, here).
        imported = []
        for i in range(sandboxes):
            _delete_all(kubectl)
            localnode.ctr(env.layout.node, "images", "remove", images.SANDBOX_IMAGE, check=False)
            started = time.monotonic()
            images.import_archive(node.CTR, env.layout.node.containerd_socket, node.CONTAINERD_NAMESPACE,
                                  images.sandbox_archive())
            import_seconds = time.monotonic() - started
            ready, sdk = _apply_to_ready(kubectl, f"imported-{i}")
            imported.append((import_seconds + ready, import_seconds + sdk, import_seconds))

        client = Sandbox(f"imported-{sandboxes - 1}", NAMESPACE)
        in_pod, on_host = [], []
        for _ in range(3):  # interleaved rounds: the machine's noise falls on both alike
            in_pod += _round_trips(client, calls // 3)
            on_host += _host_spawns(calls // 3)
    finally:
        if operator:
            operator.terminate()
            operator.wait(timeout=30)
        env.down()

    return {
        "kubernetes_version": KUBERNETES_VERSION,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "dev_up_seconds": {"control_plane": _summary(up_plain), "with_node": _summary(up_node)},
        "dev_up_node_components_median": node_components,
        "apply_to_ready_seconds": {
            "first_on_fresh_node": {"ready": first_ready, "sdk": first_sdk},
            "image_present": {"ready": _summary([r for r, _ in warm]), "sdk": _summary([s for _, s in warm])},
            "image_imported_first": {"ready": _summary([r for r, _, _ in imported]),
                                     "sdk": _summary([s for _, s, _ in imported]),
                                     "import": _summary([i for _, _, i in imported])},
        },
        "round_trip_seconds": {"sdk_into_pod": _summary(in_pod), "host_spawn": _summary(on_host)},
    }


def markdown(result: dict) -> str:
    up, ready, trip = result["dev_up_seconds"], result["apply_to_ready_seconds"], result["round_trip_seconds"]
    first, present, imported = ready["first_on_fresh_node"], ready["image_present"], ready["image_imported_first"]

    def row(measure: str, stats: dict, milliseconds: bool = False) -> str:
        if milliseconds:
            return f"| {measure} | {stats['median'] * 1000:.1f} ms | {stats['p95'] * 1000:.1f} ms | {stats['n']} |"
        return f"| {measure} | {stats['median']:.2f} | {stats['p95']:.2f} | {stats['n']} |"

    return "\n".join([
        f"# A sandbox on the local node ({result['kubernetes_version']}, {result['machine']['cpus']} CPUs, "
        f"kernel {result['machine']['kernel']})",
        "",
        "| measure | median s | p95 s | n |",
        "|---|---:|---:|---:|",
        row("`dev up` (control plane only)", up["control_plane"]),
        row("`dev up --with-node`", up["with_node"]),
        f"| apply → Running, first sandbox on a fresh node | {first['ready']:.2f} | | 1 |",
        f"| apply → SDK answers, first sandbox on a fresh node | {first['sdk']:.2f} | | 1 |",
        row("apply → Running, image present", present["ready"]),
        row("apply → SDK answers, image present", present["sdk"]),
        row("image import (no registry: `ctr import` of the cached archive)", imported["import"]),
        row("import + apply → Running (image not present)", imported["ready"]),
        row("tool call round trip through the SDK into the pod (`true`)", trip["sdk_into_pod"], milliseconds=True),
        row("the same command spawned directly on the host", trip["host_spawn"], milliseconds=True),
        "",
        "`dev up --with-node`, median per step (s): " + ", ".join(
            f"{name} {seconds:.2f}" for name, seconds in result["dev_up_node_components_median"].items()),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sandboxes", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    result = measure(args.runs, args.sandboxes, args.calls)
    report.save("node_sandbox", result, markdown(result))


if __name__ == "__main__":
    main()
