"""End-to-end tests run against an environment with a real node (containerd, runc, kubelet, the node
agent in Kubernetes mode). `devenv`, `kubectl` and `api_client` are redefined here, so that the session
caches of the integration tests' fixtures of the same names never hand out this environment; they live
for one module, so the node is gone before the integration tests start."""

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest

from agentkube.devenv import DevEnv, temporary_env
from harness import Operator, install_operator, kubectl_runner


@pytest.fixture(scope="module")
def devenv(request: pytest.FixtureRequest) -> Iterator[DevEnv]:
    failed_before = request.session.testsfailed
    with temporary_env(with_prometheus=False, with_node=True) as env:
        yield env
        if request.session.testsfailed > failed_before and env.layout.logs.is_dir():
            # The environment goes with the fixture: keep its components' logs for whoever reads the failure.
            kept = Path(tempfile.mkdtemp(prefix="agentkube-e2e-logs-"))
            shutil.copytree(env.layout.logs, kept, dirs_exist_ok=True)
            print(f"the node's component logs are kept in {kept}")


@pytest.fixture(scope="module")
def api_client(devenv: DevEnv) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))


@pytest.fixture(scope="module")
def kubectl(devenv: DevEnv):
    return kubectl_runner(devenv)


@pytest.fixture(scope="module")
def operator(devenv, kubectl, tmp_path_factory) -> Iterator[Operator]:
    running = Operator(install_operator(devenv, kubectl), tmp_path_factory.mktemp("operator"))
    running.start()
    yield running
    running.stop()
