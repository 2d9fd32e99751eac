"""Files and streamed output through the gateway, side by side in one run on the local node with the chart
installed by helm (its gateway pods, its node agent):

- one file (default 200 MiB) into a sandbox's workspace: the SDK's `upload` through the gateway against
  `kubectl cp` of the same file into the same pod (API server → kubelet → `tar` in the container), and back
  out (`download` against `kubectl cp` out), alternating, each checked by its SHA-256 inside the sandbox;
- the gateway processes' peak memory before and after the SDK's transfers;
- first-byte latency of a streamed call (`echo first; sleep 1`: the time to its first output through the
  gateway), beside the whole round trip of `echo first` through the gateway and through the runtime's
  socket on the node (the path before the gateway).

Both clients run on the node's host (the SDK reaches the gateway's Service, kubectl the API server), so
neither crosses more of the machine than the other. Writes bench/results/gateway_transfer.{json,md}.

    flock /tmp/agentkube-node.lock .venv/bin/python bench/gateway_transfer.py [--mib 200] [--runs 3] [--calls 20]
"""

import argparse
import hashlib
import json
import os
import platform
import ssl
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import report

from agentkube.client import Output, RemoteSandbox, RunResult, Sandbox
from agentkube.demo import chart_values
from agentkube.devenv import images, temporary_env
from agentkube.devenv.versions import bin_dir

CHART = Path(__file__).resolve().parents[1] / "charts" / "agentkube"
RELEASE, SYSTEM, NAMESPACE, SANDBOX = "agentkube", "agentkube-system", "bench-gateway", "bench"
SPEC = {"template": {"image": images.SANDBOX_IMAGE,
                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}},
        "tools": {"default": {"memory": "256Mi", "timeout": "5m", "network": {"egress": "none"}}}}


def _gateway_peaks() -> dict[int, int]:
    peaks = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"gateway\0run\0" in (entry / "cmdline").read_bytes():
                peaks[int(entry.name)] = int((entry / "status").read_text().split("VmHWM:")[1].split()[0]) * 1024
        except (OSError, IndexError):
            pass
    return peaks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(mib: int, runs: int, calls: int) -> dict:
    env = temporary_env(with_prometheus=False, with_node=True, node_agent="none")
    environ = env.environ()

    def kubectl(*args: str, input: str | None = None) -> str:
        return subprocess.run([str(bin_dir() / "kubectl"), *args], env=environ, capture_output=True, text=True,
                              check=True, input=input, timeout=600).stdout

    try:
        env.up()
        subprocess.run([str(bin_dir() / "helm"), "install", RELEASE, str(CHART), "-n", SYSTEM, "--create-namespace",
                        "--wait", "--timeout=5m", *chart_values(env)], env=environ, check=True, capture_output=True)
        kubectl("create", "namespace", NAMESPACE)
        kubectl("create", "serviceaccount", "agent", "-n", NAMESPACE)
        kubectl("create", "rolebinding", "agent", "-n", NAMESPACE, f"--clusterrole={RELEASE}-sandbox-user",
                f"--serviceaccount={NAMESPACE}:agent")
        kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(
            {"apiVersion": "agentkube.dev/v1alpha1", "kind": "AgentSandbox", "metadata": {"name": SANDBOX}, "spec": SPEC}))
        kubectl("wait", "-n", NAMESPACE, "--for=jsonpath={.status.phase}=Running", f"agentsandbox/{SANDBOX}",
                "--timeout=180s")
        token = kubectl("create", "token", "agent", "-n", NAMESPACE, "--duration=1h").strip()
        address = kubectl("get", "service", "-n", SYSTEM, f"{RELEASE}-gateway", "-o", "jsonpath={.spec.clusterIP}")
        # The node reaches the Service by its cluster IP, which the certificate does not name: TLS with the
        # chart's CA, the host name left unchecked (the agents' pods check it: they use the Service's name).
        ca = kubectl("get", "configmap", "-n", SYSTEM, f"{RELEASE}-gateway-ca", "-o", "jsonpath={.data.ca\\.crt}")
        tls = ssl.create_default_context(cadata=ca)
        tls.check_hostname = False
        box = RemoteSandbox(SANDBOX, NAMESPACE, f"https://{address}:8080", lambda: token, tls)
        local = Sandbox(SANDBOX, NAMESPACE)
        box.run(["true"])  # the first call resolves and connects everything once

        scratch = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
        source = scratch / "file.bin"
        with open(source, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        expected = _sha256(source)

        def inside(path: str) -> str:
            return box.run(["sha256sum", f"/workspace/{path}"]).stdout.split()[0]

        times: dict[str, list[float]] = {"sdk_upload": [], "kubectl_cp_upload": [], "sdk_download": [],
                                         "kubectl_cp_download": []}
        before = _gateway_peaks()
        for run in range(runs):
            times["sdk_upload"].append(_timed(lambda: box.upload(source, "sdk.bin")))
            times["kubectl_cp_upload"].append(_timed(lambda: kubectl("cp", "-c", "sandbox", str(source),
                                                                     f"{NAMESPACE}/{SANDBOX}:/workspace/cp.bin")))
            if run == 0:
                assert inside("sdk.bin") == expected and inside("cp.bin") == expected, "a copy differs"
            times["sdk_download"].append(_timed(lambda: box.download("sdk.bin", scratch / "sdk.out")))
            times["kubectl_cp_download"].append(_timed(lambda: kubectl("cp", "-c", "sandbox",
                                                                       f"{NAMESPACE}/{SANDBOX}:/workspace/cp.bin",
                                                                       str(scratch / "cp.out"))))
            if run == 0:
                assert _sha256(scratch / "sdk.out") == expected and _sha256(scratch / "cp.out") == expected
        after = _gateway_peaks()
        growth = max((after[pid] - before[pid] for pid in before if pid in after), default=None)

        def first_output() -> float:
            started, first = time.perf_counter(), None
            for event in box.stream("echo first; sleep 1", timeout=30):
                if isinstance(event, Output) and first is None:
                    first = time.perf_counter() - started
                elif isinstance(event, RunResult) and first is not None:
                    return first
            raise RuntimeError("the stream ended without output or a result")

        latency: dict[str, list[float]] = {"stream_first_output": [], "gateway_run_echo": [], "node_socket_run_echo": []}
        for _ in range(calls):
            latency["stream_first_output"].append(first_output())
            latency["gateway_run_echo"].append(_timed(lambda: box.run(["echo", "first"])))
            latency["node_socket_run_echo"].append(_timed(lambda: local.run(["echo", "first"])))
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
    finally:
        env.down()
    return {
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(), "load_average": os.getloadavg()},
        "file_mib": mib, "runs": runs, "calls": calls,
        "transfer_seconds": times,
        "transfer_mib_per_second_median": {k: mib / statistics.median(v) for k, v in times.items()},
        "gateway_peak_memory_growth_bytes": growth,
        "latency_seconds": latency,
        "latency_median_ms": {k: statistics.median(v) * 1000 for k, v in latency.items()},
    }


def markdown(result: dict) -> str:
    rate, lat = result["transfer_mib_per_second_median"], result["latency_median_ms"]
    growth = result["gateway_peak_memory_growth_bytes"]
    return "\n".join([
        f"# Files and streaming through the gateway ({result['file_mib']} MiB file, {result['runs']} runs; "
        f"{result['machine']['cpus']} CPUs, load {result['machine']['load_average'][0]:.1f})",
        "",
        "| transfer | agentkube SDK via gateway, MiB/s | `kubectl cp`, MiB/s | SDK / kubectl cp |",
        "|---|---:|---:|---:|",
        f"| upload | {rate['sdk_upload']:.0f} | {rate['kubectl_cp_upload']:.0f} | "
        f"{rate['sdk_upload'] / rate['kubectl_cp_upload']:.2f}× |",
        f"| download | {rate['sdk_download']:.0f} | {rate['kubectl_cp_download']:.0f} | "
        f"{rate['sdk_download'] / rate['kubectl_cp_download']:.2f}× |",
        "",
        f"Gateway processes' peak memory grew by {growth / 2**20:.1f} MiB over all SDK transfers."
        if growth is not None else "Gateway processes' peak memory: not found.",
        "",
        f"| call ({result['calls']} each, median) | ms |",
        "|---|---:|",
        f"| first output of `echo first; sleep 1`, streamed through the gateway | {lat['stream_first_output']:.1f} |",
        f"| whole `echo first` through the gateway | {lat['gateway_run_echo']:.1f} |",
        f"| whole `echo first` through the runtime's socket on the node | {lat['node_socket_run_echo']:.1f} |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    result = measure(args.mib, args.runs, args.calls)
    report.save("gateway_transfer", result, markdown(result))


if __name__ == "__main__":
    main()
