"""The real Prometheus scrapes a target served on loopback, and prometheus-api-client reads it back."""

import threading
import time
from collections.abc import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
from prometheus_api_client import PrometheusConnect
from prometheus_client import CollectorRegistry, Gauge, make_wsgi_app

SERVER_LIFETIME = 120.0  # the exporter stops by itself even if the test never does


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def exporter() -> Iterator[tuple[str, Gauge]]:
    """A Prometheus exporter on 127.0.0.1 with one gauge, serving for a bounded time."""
    registry = CollectorRegistry()
    gauge = Gauge("agentkube_test_queue_depth", "A value the test sets and expects back.", ["pool"], registry=registry)
    server: WSGIServer = make_server("127.0.0.1", 0, make_wsgi_app(registry), handler_class=_QuietHandler)
    server.timeout = 0.5
    stop = threading.Event()
    deadline = time.monotonic() + SERVER_LIFETIME

    def serve() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            server.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_port}", gauge
    finally:
        stop.set()
        thread.join(timeout=5)
        server.server_close()


def test_prometheus_scrapes_a_loopback_target(devenv, exporter, eventually):
    address, gauge = exporter
    gauge.labels(pool="spot").set(42)
    devenv.add_scrape_target("agentkube-test", [address], labels={"suite": "integration"})
    prometheus = PrometheusConnect(url=devenv.prometheus_url, disable_ssl=True)
    try:
        series = eventually(
            lambda: prometheus.get_current_metric_value("agentkube_test_queue_depth", label_config={"pool": "spot"}),
            timeout=60,
            message="Prometheus did not scrape the exporter",
        )
        assert series[0]["metric"]["job"] == "agentkube-test"
        assert series[0]["metric"]["suite"] == "integration"
        assert series[0]["metric"]["instance"] == address
        assert float(series[0]["value"][1]) == 42.0

        up = prometheus.custom_query(f'up{{job="agentkube-test", instance="{address}"}}')
        assert up and up[0]["value"][1] == "1"
    finally:
        devenv.remove_scrape_target("agentkube-test")


def test_prometheus_scrapes_the_apiserver_as_a_least_privileged_identity(devenv, eventually):
    prometheus = PrometheusConnect(url=devenv.prometheus_url, disable_ssl=True)
    up = eventually(
        lambda: prometheus.custom_query('up{job="kube-apiserver"}'), timeout=60, message="apiserver not scraped"
    )
    assert up[0]["value"][1] == "1"
