"""Shared fixtures. Integration tests share one real control plane for the whole session."""

import signal
import time
from collections.abc import Iterator

import kubernetes
import pytest

from agentkube.devenv import DevEnv, temporary_env
from harness import kubectl_runner


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (a CI time-out, `kill`) unwinds like Ctrl-C, so fixtures tear down.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


@pytest.fixture(scope="session")
def devenv() -> Iterator[DevEnv]:
    """etcd, kube-apiserver, kube-controller-manager and Prometheus, started once per test session.

    The processes die with this pytest process (even on SIGKILL) and the state directory is removed
    at the end, pass, fail or interrupt."""
    with temporary_env() as env:
        yield env


@pytest.fixture(scope="session")
def api_client(devenv: DevEnv) -> kubernetes.client.ApiClient:
    return kubernetes.config.new_client_from_config(config_file=str(devenv.kubeconfig))


@pytest.fixture(scope="session")
def kubectl(devenv: DevEnv):
    """Run the real kubectl against the environment; returns the completed process."""
    return kubectl_runner(devenv)


@pytest.fixture
def namespace(api_client: kubernetes.client.ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    core = kubernetes.client.CoreV1Api(api_client)
    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    core.create_namespace(kubernetes.client.V1Namespace(metadata=kubernetes.client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def eventually():
    """Poll `condition` until it returns a truthy value (returned) or fail after `timeout` seconds.

    Controllers and informers act asynchronously; tests wait for the outcome, never for a fixed time."""

    def wait(condition, timeout: float = 60.0, interval: float = 0.2, message: str = "condition not met"):
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{message} within {timeout:.0f}s")
            time.sleep(interval)

    return wait
