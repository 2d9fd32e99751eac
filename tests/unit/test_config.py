"""The decisions about the local environment: command lines, identities, configuration documents."""

import base64
from pathlib import Path

import pytest

from agentkube.devenv import config
from agentkube.devenv.config import Layout, Ports

LAYOUT = Layout(Path("/state"))
PORTS = Ports(etcd_client=2379, etcd_peer=2380, apiserver=6443, controller_manager=10257, prometheus=9090,
              scheduler=10259, kubelet=10250, kubelet_healthz=10248)


def _flags(argv: list[str]) -> dict[str, str]:
    return dict(arg.removeprefix("--").partition("=")[::2] for arg in argv[1:])


def test_every_component_listens_on_loopback_only():
    etcd = _flags(config.etcd_command(Path("etcd"), LAYOUT, PORTS))
    assert etcd["listen-client-urls"] == "https://127.0.0.1:2379"
    assert etcd["listen-peer-urls"] == "https://127.0.0.1:2380"
    assert _flags(config.apiserver_command(Path("a"), LAYOUT, PORTS))["bind-address"] == "127.0.0.1"
    assert _flags(config.controller_manager_command(Path("c"), LAYOUT, PORTS))["bind-address"] == "127.0.0.1"
    assert _flags(config.prometheus_command(Path("p"), LAYOUT, PORTS))["web.listen-address"] == "127.0.0.1:9090"


def test_apiserver_enforces_rbac_and_authenticates_every_client():
    flags = _flags(config.apiserver_command(Path("kube-apiserver"), LAYOUT, PORTS))
    assert "RBAC" in flags["authorization-mode"].split(",")
    assert "AlwaysAllow" not in flags["authorization-mode"]
    assert flags["anonymous-auth"] == "false"
    assert flags["client-ca-file"] == "/state/pki/ca.crt"
    assert flags["etcd-servers"] == "https://127.0.0.1:2379"
    assert flags["service-account-signing-key-file"] == "/state/pki/service-account.key"


def test_etcd_requires_client_certificates_for_clients_and_peers():
    flags = _flags(config.etcd_command(Path("etcd"), LAYOUT, PORTS))
    assert "client-cert-auth" in flags and "peer-client-cert-auth" in flags
    assert flags["peer-trusted-ca-file"] == flags["trusted-ca-file"] == "/state/pki/ca.crt"


def test_only_the_admin_identity_is_a_cluster_admin():
    assert config.ADMIN.groups == ("system:masters",)
    others = [config.CONTROLLER_MANAGER, config.PROMETHEUS, config.APISERVER_ETCD_CLIENT]
    assert all("system:masters" not in identity.groups for identity in others)


def test_kubeconfig_is_self_contained():
    document = config.kubeconfig("https://127.0.0.1:6443", b"CA", b"CERT", b"KEY", "someone")
    cluster = document["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA"
    user = document["users"][0]["user"]
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    assert document["contexts"][0]["context"] == {"cluster": config.CLUSTER_NAME, "user": "someone"}
    assert document["current-context"] == config.CLUSTER_NAME


def test_prometheus_config_scrapes_the_apiserver_and_discovered_targets():
    document = config.prometheus_config(LAYOUT, PORTS)
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    apiserver = jobs["kube-apiserver"]
    assert apiserver["static_configs"] == [{"targets": ["127.0.0.1:6443"]}]
    assert apiserver["tls_config"]["cert_file"] == "/state/pki/prometheus.crt"
    assert jobs["discovered"]["file_sd_configs"][0]["files"] == ["/state/prometheus/targets/*.json"]


def test_scrape_target_group_sets_the_job_label():
    group = config.scrape_target_group("model", ["127.0.0.1:8080"], {"pool": "spot", "job": "ignored"})
    assert group == [{"targets": ["127.0.0.1:8080"], "labels": {"pool": "spot", "job": "model"}}]


@pytest.mark.parametrize("address", ["127.0.0.1", ":8080", "host:port", ""])
def test_scrape_target_group_rejects_addresses_without_a_port(address):
    with pytest.raises(ValueError, match="host:port"):
        config.scrape_target_group("job", [address])
