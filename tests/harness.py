"""What integration and end-to-end tests share: the operator as it runs in production (a child process
authenticated as the chart's service account, with the chart's RBAC)."""

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agentkube.demo import CHART as CHART  # one definition of where the chart is
from agentkube.devenv import DevEnv, knative, process, temporary_env
from agentkube.devenv.cluster import free_port
from agentkube.devenv.versions import bin_dir
from agentkube.operator import crds

REPO = Path(__file__).resolve().parents[1]
SYSTEM_NAMESPACE = "agentkube-system"
OPERATOR_SA = "agentkube-operator"


def host_address() -> str:
    """This machine's own IPv4 address on the interface of its default route: a destination off a call's
    loopback that never leaves the machine. Not simply the first global address: a running node agent
    puts the node's DNS address on `lo` with global scope."""
    route = subprocess.run(["ip", "-4", "-o", "route", "show", "default"], capture_output=True, text=True, check=True)
    words = route.stdout.split()
    device = words[words.index("dev") + 1]
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", device, "scope", "global"], capture_output=True,
                         text=True, check=True)
    return out.stdout.split()[3].split("/")[0]


class Operator:
    """`agentkube operator run` in a child process, as its service account."""

    def __init__(self, kubeconfig: Path, log_dir: Path, *options: str):
        self.kubeconfig, self.log_dir, self.options = kubeconfig, log_dir, options
        self.record: process.ProcessRecord | None = None
        self.metrics_port = self.liveness_port = 0
        self.starts = 0

    def start(self) -> None:
        self.metrics_port, self.liveness_port = free_port(), free_port()
        self.starts += 1
        argv = [sys.executable, "-m", "agentkube", "operator", "run",
                f"--metrics-port={self.metrics_port}", f"--liveness-port={self.liveness_port}", *self.options]
        self.record = process.start("operator", ["env", f"KUBECONFIG={self.kubeconfig}", *argv],
                                    self.log_path, tie_to_parent=True)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"operator-{self.starts}.log"

    def log_lines(self, *words: str) -> list[str]:
        """The lines of its log that name any of `words`: what it did about them, for a failed assertion's message."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [line for line in text.splitlines() if any(word in line for word in words)]

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything it was doing."""
        assert self.record is not None
        process.signal_group(self.record.pid, signal.SIGKILL)
        process.stop([self.record])

    def stop(self) -> None:
        if self.record is not None:
            process.stop([self.record])


def helm_template(*show_only: str, values: tuple[str, ...] = ()) -> str:
    """`values`: `--set` assignments, e.g. ("operator.shards=2",)."""
    args = [str(bin_dir() / "helm"), "template", "agentkube", str(CHART), "--namespace", SYSTEM_NAMESPACE]
    for template in show_only:
        args += ["--show-only", f"templates/{template}"]
    for value in values:
        args += ["--set", value]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def install_operator(devenv: DevEnv, kubectl) -> Path:
    """CRDs, the chart's service account, RBAC and peering object; returns the operator's kubeconfig."""
    kubectl("apply", "-f", str(crds.CRD_DIRECTORY))
    for name in (*(kind.crd_name for kind in crds.KINDS), "clusterkopfpeerings.kopf.dev"):
        kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=60s")
    kubectl("create", "namespace", SYSTEM_NAMESPACE, check=False)
    rendered = helm_template("serviceaccount.yaml", "clusterrole.yaml", "clusterrolebinding.yaml", "peering.yaml")
    kubectl("apply", "-f", "-", input=rendered)
    token = kubectl("create", "token", OPERATOR_SA, "-n", SYSTEM_NAMESPACE, "--duration=6h").stdout.strip()
    return devenv.write_token_kubeconfig(OPERATOR_SA, token)


def kubectl_runner(devenv: DevEnv):
    """The real kubectl against `devenv`: run(*args, check=True, input=None) -> CompletedProcess."""

    def run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(bin_dir() / "kubectl"), *args], env=devenv.environ(), capture_output=True,
                              text=True, input=input, timeout=60)
        if check and done.returncode != 0:  # what kubectl said, in the failure's message
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr or done.stdout}")
        return done

    return run


def install_knative_crds(kubectl) -> None:
    """Knative Serving's own CRDs (no Knative controller), Established on return. `kubectl wait` fails
    rather than waits on a CRD whose first status the API server has not written yet: retried."""
    kubectl("apply", "-f", str(knative.crds_file()))
    deadline = time.monotonic() + 60
    while kubectl("wait", "--for=condition=Established", "crd", "-l", "knative.dev/crd-install=true", "--timeout=30s",
                  check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError("Knative's CRDs were not Established within 60 s")
        time.sleep(0.5)


@contextmanager
def node_environment(request: pytest.FixtureRequest, node_agent: str = "host",
                     with_prometheus: bool = False, with_knative: bool = False,
                     with_capacity: bool = False) -> Iterator[DevEnv]:
    """A temporary environment with the node (`node_agent`: see DevEnv; `with_knative`: Knative Serving
    on it), its logs kept if a test failed."""
    failed_before = request.session.testsfailed
    with temporary_env(with_prometheus=with_prometheus, with_node=True, node_agent=node_agent,
                       with_knative=with_knative, with_capacity=with_capacity) as env:
        yield env
        if request.session.testsfailed > failed_before and env.layout.logs.is_dir():
            # The environment goes with the fixture: keep its components' logs for whoever reads the failure.
            kept = Path(tempfile.mkdtemp(prefix="agentkube-e2e-logs-"))
            shutil.copytree(env.layout.logs, kept, dirs_exist_ok=True)
            print(f"the node's component logs are kept in {kept}")
