"""End-to-end tests run against an environment with a real node (containerd, runc, kubelet, the node
agent in Kubernetes mode). `devenv`, `kubectl` and `api_client` are redefined here, so that the session
caches of the integration tests' fixtures of the same names never hand out this environment; they live
for one module, so the node is gone before the integration tests start."""

from collections.abc import Iterator

import kubernetes
import pytest

from agentkube.devenv import DevEnv
from harness import Operator, install_operator, kubectl_runner, node_environment


@pytest.fixture(scope="module")
def devenv(request: pytest.FixtureRequest) -> Iterator[DevEnv]:
    with node_environment(request) as env:
        yield env


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
