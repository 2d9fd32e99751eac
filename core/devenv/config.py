"""Pure functions that decide how the local environment looks: where each file lives, which identity
each component has, and the exact command line and configuration of each process."""

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentkube.devenv import images, localpath, network, node
from agentkube.devenv.node import NODE_NAME, SERVICE_CIDR, NodeLayout

LOOPBACK = "127.0.0.1"
# The first address of the service range is the `kubernetes` Service's ClusterIP: the apiserver's
# serving certificate must name it for in-cluster clients.
KUBERNETES_SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER_NAME = "agentkube-dev"
APISERVER_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
# The file-discovered scrape targets are scraped this often; Knative's autoscaler reads 1 s buckets.
SCRAPE_INTERVAL = "1s"
APISERVER_SCRAPE_INTERVAL = "15s"


@dataclass(frozen=True)
class ClientIdentity:
    """A client certificate's subject: Kubernetes takes the user from CN and the groups from O."""

    user: str
    groups: tuple[str, ...] = ()


# Least privilege: only the admin kubeconfig handed to the user is in system:masters. The controller
# manager and Prometheus authenticate as the identities Kubernetes' bootstrap RBAC policy already grants.
ADMIN = ClientIdentity("agentkube-admin", ("system:masters",))
CONTROLLER_MANAGER = ClientIdentity("system:kube-controller-manager")
PROMETHEUS = ClientIdentity("agentkube-prometheus", ("system:monitoring",))
APISERVER_ETCD_CLIENT = ClientIdentity("kube-apiserver-etcd-client")
SCHEDULER = ClientIdentity("system:kube-scheduler")
# The Node authorizer and NodeRestriction confine the kubelet to its own node's objects by this name.
KUBELET = ClientIdentity(f"system:node:{NODE_NAME}", ("system:nodes",))
# The apiserver calls the kubelet (logs, exec, port-forward) as this identity; RBAC binds it (node.node_rbac).
APISERVER_KUBELET_CLIENT = ClientIdentity("kube-apiserver-kubelet-client")
NODE_AGENT = ClientIdentity("agentkube:node-agent")
# Kubernetes' bootstrap policy binds system:node-proxier to this user: what kube-proxy may read and record.
KUBE_PROXY = ClientIdentity("system:kube-proxy")
# Bound to a ClusterRole of its own (network.coredns_rbac): list/watch Services, EndpointSlices, Namespaces.
COREDNS = ClientIdentity("agentkube:coredns")
# Bound to a read-only ClusterRole of its own (network.kube_router_rbac).
KUBE_ROUTER = ClientIdentity("agentkube:kube-router")
# Bound to what it needs to provision volumes (localpath.provisioner_rbac).
LOCAL_PATH_PROVISIONER = ClientIdentity("agentkube:local-path-provisioner")

# Client certificates by file name. The front-proxy client is separate: it is signed by its own CA.
CLIENT_CERTIFICATES = {
    "admin": ADMIN,
    "controller-manager-client": CONTROLLER_MANAGER,
    "prometheus": PROMETHEUS,
    "apiserver-etcd-client": APISERVER_ETCD_CLIENT,
    "scheduler-client": SCHEDULER,
    "kubelet-client": KUBELET,
    "apiserver-kubelet-client": APISERVER_KUBELET_CLIENT,
    "node-agent": NODE_AGENT,
    "kube-proxy-client": KUBE_PROXY,
    "coredns-client": COREDNS,
    "kube-router-client": KUBE_ROUTER,
    "local-path-provisioner-client": LOCAL_PATH_PROVISIONER,
}
# The apiserver proxies to aggregated APIs as this identity, signed by a CA of its own (as kubeadm does)
# so that no other client certificate can assert a user through the request headers.
FRONT_PROXY_CLIENT = ClientIdentity("front-proxy-client")


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    prometheus: int
    scheduler: int
    kubelet: int
    kubelet_healthz: int
    # Defaults: a state file written before these existed still loads (and can be taken down).
    kube_proxy_healthz: int = 0
    kube_proxy_metrics: int = 0
    coredns_ready: int = 0


@dataclass(frozen=True)
class Layout:
    """Every file of one environment lives under `root`, so removing it removes everything."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def prometheus_data(self) -> Path:
        return self.root / "prometheus" / "data"

    @property
    def prometheus_config(self) -> Path:
        return self.root / "prometheus" / "prometheus.yml"

    @property
    def scrape_targets(self) -> Path:
        return self.root / "prometheus" / "targets"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def controller_manager_kubeconfig(self) -> Path:
        return self.pki / "controller-manager.kubeconfig"

    @property
    def service_account_public_key(self) -> Path:
        return self.pki / "service-account.pub"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    def cert(self, name: str) -> Path:
        return self.pki / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.pki / f"{name}.key"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def client_kubeconfig(self, name: str) -> Path:
        """The kubeconfig of the client certificate `name` (a CLIENT_CERTIFICATES key)."""
        return self.pki / f"{name}.kubeconfig"

    @property
    def node(self) -> NodeLayout:
        return NodeLayout(self.root / "node")


def apiserver_url(ports: Ports, host: str = LOOPBACK) -> str:
    return f"https://{host}:{ports.apiserver}"


def etcd_url(port: int) -> str:
    return f"https://{LOOPBACK}:{port}"


def prometheus_url(ports: Ports, host: str = LOOPBACK) -> str:
    return f"http://{host}:{ports.prometheus}"


def etcd_health_url(ports: Ports) -> str:
    return f"{etcd_url(ports.etcd_client)}/health"


def apiserver_health_url(ports: Ports, host: str = LOOPBACK) -> str:
    return f"{apiserver_url(ports, host)}/readyz"


def controller_manager_health_url(ports: Ports) -> str:
    return f"https://{LOOPBACK}:{ports.controller_manager}/healthz"


def prometheus_health_url(ports: Ports, host: str = LOOPBACK) -> str:
    return f"{prometheus_url(ports, host)}/-/ready"


def etcd_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    client, peer = etcd_url(ports.etcd_client), etcd_url(ports.etcd_peer)
    tls = [f"--cert-file={layout.cert('etcd')}", f"--key-file={layout.key('etcd')}", f"--trusted-ca-file={layout.cert('ca')}"]
    return [
        str(binary),
        "--name=default",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=default={peer}",
        *tls,
        "--client-cert-auth",
        *(flag.replace("--", "--peer-", 1) for flag in tls),
        "--peer-client-cert-auth",
        # A throw-away development store: durability is not worth an fsync per write (envtest does the same).
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def apiserver_command(binary: Path, layout: Layout, ports: Ports, host: str = LOOPBACK) -> list[str]:
    return [
        str(binary),
        f"--etcd-servers={etcd_url(ports.etcd_client)}",
        f"--etcd-cafile={layout.cert('ca')}",
        f"--etcd-certfile={layout.cert('apiserver-etcd-client')}",
        f"--etcd-keyfile={layout.key('apiserver-etcd-client')}",
        f"--bind-address={host}",
        # Pods reach it through the `kubernetes` Service, whose endpoint is this address.
        f"--advertise-address={host}",
        f"--secure-port={ports.apiserver}",
        f"--tls-cert-file={layout.cert('apiserver')}",
        f"--tls-private-key-file={layout.key('apiserver')}",
        f"--client-ca-file={layout.cert('ca')}",
        "--authorization-mode=Node,RBAC",
        "--anonymous-auth=false",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={layout.service_account_public_key}",
        f"--service-account-signing-key-file={layout.key('service-account')}",
        f"--requestheader-client-ca-file={layout.cert('front-proxy-ca')}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT.user}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={layout.cert('front-proxy-client')}",
        f"--proxy-client-key-file={layout.key('front-proxy-client')}",
        f"--kubelet-client-certificate={layout.cert('apiserver-kubelet-client')}",
        f"--kubelet-client-key={layout.key('apiserver-kubelet-client')}",
        f"--kubelet-certificate-authority={layout.cert('ca')}",
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-admission-plugins=NodeRestriction",
        # The `kubernetes` Service's endpoints may not be a loopback address: on loopback (no node, nothing
        # routes the service IP) the apiserver publishes none; on the node's address it does.
        f"--endpoint-reconciler-type={'none' if host == LOOPBACK else 'lease'}",
        "--allow-privileged=true",
        "--profiling=false",
    ]


def scheduler_health_url(ports: Ports) -> str:
    return f"https://{LOOPBACK}:{ports.scheduler}/healthz"


def kubelet_health_url(ports: Ports) -> str:
    return f"http://{LOOPBACK}:{ports.kubelet_healthz}/healthz"


def scheduler_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return node.scheduler_command(binary, layout.client_kubeconfig("scheduler-client"), ports.scheduler, layout.pki)


def kubelet_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return node.kubelet_command(binary, layout.node, layout.client_kubeconfig("kubelet-client"))


def kube_proxy_health_url(ports: Ports) -> str:
    return f"http://{LOOPBACK}:{ports.kube_proxy_healthz}/healthz"


def coredns_health_url(ports: Ports) -> str:
    """Answers 200 once the `kubernetes` plugin has synced with the API: the names are there to serve."""
    return f"http://{LOOPBACK}:{ports.coredns_ready}/ready"


def kube_proxy_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return network.kube_proxy_command(binary, layout.client_kubeconfig("kube-proxy-client"),
                                      ports.kube_proxy_healthz, ports.kube_proxy_metrics)


def coredns_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return network.coredns_command(binary, layout.node.corefile)


def kube_router_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return network.kube_router_command(binary, layout.client_kubeconfig("kube-router-client"), SERVICE_CIDR)


def local_path_config_dir(layout: Layout) -> Path:
    return layout.node.root / "local-path-provisioner"


def local_path_provisioner_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return localpath.command(binary, layout.client_kubeconfig("local-path-provisioner-client"),
                             local_path_config_dir(layout), images.SANDBOX_IMAGE)


def corefile(layout: Layout, ports: Ports) -> str:
    return network.corefile(layout.client_kubeconfig("coredns-client"), ports.coredns_ready)


def controller_manager_command(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    kubeconfig = layout.controller_manager_kubeconfig
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={ports.controller_manager}",
        f"--tls-cert-file={layout.cert('controller-manager')}",
        f"--tls-private-key-file={layout.key('controller-manager')}",
        f"--client-ca-file={layout.cert('ca')}",
        # Each controller acts with its own service account, so RBAC limits each to what it needs.
        "--use-service-account-credentials",
        f"--service-account-private-key-file={layout.key('service-account')}",
        f"--root-ca-file={layout.cert('ca')}",
        f"--cluster-signing-cert-file={layout.cert('ca')}",
        f"--cluster-signing-key-file={layout.key('ca')}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # The node's spec.podCIDRs, as in any cluster, for whoever discovers the pod network from the API
        # (the node agent's `cluster` egress mode): the one node gets the whole pod subnet.
        "--allocate-node-cidrs=true",
        f"--cluster-cidr={node.POD_SUBNET}",
        f"--node-cidr-mask-size={node.POD_SUBNET.split('/')[1]}",
        "--leader-elect=false",
        "--profiling=false",
    ]


def prometheus_command(binary: Path, layout: Layout, ports: Ports, host: str = LOOPBACK) -> list[str]:
    return [
        str(binary),
        f"--config.file={layout.prometheus_config}",
        f"--storage.tsdb.path={layout.prometheus_data}",
        f"--web.listen-address={host}:{ports.prometheus}",
        "--storage.tsdb.retention.time=1d",
        "--log.level=warn",
    ]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def kubeconfig(server: str, ca_pem: bytes, cert_pem: bytes, key_pem: bytes, user: str) -> dict[str, Any]:
    """A self-contained kubeconfig (credentials inline) for one client-certificate identity."""
    return _kubeconfig(server, ca_pem, user, {"client-certificate-data": _b64(cert_pem), "client-key-data": _b64(key_pem)})


def token_kubeconfig(server: str, ca_pem: bytes, user: str, token: str) -> dict[str, Any]:
    """A kubeconfig for a bearer token, e.g. a service account's: how an in-cluster workload authenticates."""
    return _kubeconfig(server, ca_pem, user, {"token": token})


def _kubeconfig(server: str, ca_pem: bytes, user: str, credentials: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": CLUSTER_NAME, "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": CLUSTER_NAME, "context": {"cluster": CLUSTER_NAME, "user": user}}],
        "current-context": CLUSTER_NAME,
    }


def prometheus_config(layout: Layout, ports: Ports, apiserver_host: str = LOOPBACK) -> dict[str, Any]:
    """Scrapes the apiserver (as the monitoring identity) and whatever targets are dropped as files into
    `layout.scrape_targets`: Prometheus watches that folder, so targets come and go without a restart."""
    return {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [
            {
                "job_name": "kube-apiserver",
                "scrape_interval": APISERVER_SCRAPE_INTERVAL,
                "scheme": "https",
                "tls_config": {
                    "ca_file": str(layout.cert("ca")),
                    "cert_file": str(layout.cert("prometheus")),
                    "key_file": str(layout.key("prometheus")),
                },
                "static_configs": [{"targets": [f"{apiserver_host}:{ports.apiserver}"]}],
            },
            {
                "job_name": "discovered",
                "file_sd_configs": [{"files": [str(layout.scrape_targets / "*.json")], "refresh_interval": "1s"}],
            },
        ],
    }


def scrape_target_group(job: str, addresses: list[str], labels: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One file_sd target group; its `job` label overrides the scrape config's job name."""
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"scrape target must be host:port, got {address!r}")
    return [{"targets": list(addresses), "labels": {**(labels or {}), "job": job}}]
