"""The host side of the local node: what it sets up on this machine before its processes start (the
bridge, the firewall, sysctls), and everything `dev down` must take away after they stop (containers,
mounts, network namespaces, the bridge, iptables chains and ipsets, cgroups). The decisions (paths,
configs, rules) are in `node` and `network`; this module only does them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path

import psutil

from agentkube.contract import RUNTIME_SOCKET_DIR
from agentkube.devenv import network, node
from agentkube.devenv.node import BRIDGE, CONTAINERD_NAMESPACE, CTR, NODE_LOCK, NodeLayout
from agentkube.ebpf import csi

CGROUP_ROOT = Path("/sys/fs/cgroup")
KUBEPODS = "kubepods"
# Left by the kubelet in fixed places whatever its --root-dir.
KUBELET_FIXED_SOCKETS = (Path("/var/lib/kubelet/device-plugins/kubelet.sock"),)


class NodeError(RuntimeError):
    """The node cannot start on this machine; the message says why."""


def other_owner(environment: Path) -> Path | None:
    """The other environment that holds this machine's node, if any (a claim whose environment is gone
    is stale and counts for nobody)."""
    if not NODE_LOCK.exists():
        return None
    owner = Path(NODE_LOCK.read_text().strip())
    return owner if owner != environment and (owner / "state.json").is_file() else None


def acquire(environment: Path) -> None:
    """Claim this machine's one node for `environment`."""
    owner = other_owner(environment)
    if owner is not None:
        raise NodeError(f"this machine's node belongs to the environment in {owner}: "
                        f"run `agentkube dev down --state-dir {owner}` first")
    NODE_LOCK.parent.mkdir(parents=True, exist_ok=True)
    NODE_LOCK.write_text(str(environment))


def release(environment: Path) -> None:
    if NODE_LOCK.exists() and Path(NODE_LOCK.read_text().strip()) == environment:
        NODE_LOCK.unlink()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NodeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def create_bridge() -> None:
    """The pods' bridge, holding the node's address before the kubelet starts (it must find its node IP
    on an interface) and the cluster DNS's; the CNI bridge plugin then attaches pods to it."""
    if _ip("link", "show", BRIDGE, check=False).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    addresses = _ip("-o", "addr", "show", "dev", BRIDGE).stdout
    if f" {node.NODE_IP}/" not in addresses:
        _ip("addr", "add", f"{node.NODE_IP}/{node.POD_SUBNET.split('/')[1]}", "dev", BRIDGE)
    # The cluster DNS's own address, where CoreDNS listens (why: network.dns_objects).
    if f" {node.CLUSTER_DNS_IP}/" not in addresses:
        _ip("addr", "add", f"{node.CLUSTER_DNS_IP}/32", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _iptables(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # -w: wait for the xtables lock that kube-proxy holds while it writes its rules.
    result = subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NodeError(f"`iptables {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def install_firewall() -> None:
    """The node's chain (network.firewall_rules), made afresh, and its jump first in FORWARD."""
    remove_firewall()
    table, chain = network.FIREWALL_TABLE, network.FIREWALL_CHAIN
    _iptables("-t", table, "-N", chain)
    for rule in network.firewall_rules():
        _iptables("-t", table, "-A", chain, *rule)
    _iptables("-t", table, "-I", network.FIREWALL_HOOK, "1", *network.firewall_jump())


def firewall_installed() -> bool:
    return _iptables("-t", network.FIREWALL_TABLE, "-S", network.FIREWALL_CHAIN, check=False).returncode == 0


def remove_firewall() -> None:
    table, chain = network.FIREWALL_TABLE, network.FIREWALL_CHAIN
    jump = network.firewall_jump()
    while _iptables("-t", table, "-C", network.FIREWALL_HOOK, *jump, check=False).returncode == 0:
        _iptables("-t", table, "-D", network.FIREWALL_HOOK, *jump)
    _iptables("-t", table, "-F", chain, check=False)
    _iptables("-t", table, "-X", chain, check=False)


def set_host_sysctls() -> None:
    """network.HOST_SYSCTLS; br_netfilter must be loaded for the bridge's settings to exist."""
    if not network.sysctl_path("net.bridge.bridge-nf-call-iptables").exists():
        subprocess.run(["modprobe", "br_netfilter"], capture_output=True)
    for name, value in network.HOST_SYSCTLS.items():
        path = network.sysctl_path(name)
        if not path.exists():
            raise NodeError(f"{path} is missing: the node needs the br_netfilter module (`modprobe br_netfilter`)")
        if path.read_text().strip() != value:
            path.write_text(value)


def kube_proxy_rules_present() -> bool:
    """Whether kube-proxy's chains are in the nat table (they outlive it until `--cleanup`)."""
    return _iptables("-t", "nat", "-S", "KUBE-SERVICES", check=False).returncode == 0


def node_chains_present() -> list[str]:
    """The node's chains (network.NODE_CHAIN_PREFIXES) still in any table, IPv4 or IPv6."""
    found = []
    for command in ("iptables", "ip6tables"):
        for table in network.IPTABLES_TABLES:
            listing = subprocess.run([command, "-w", "5", "-t", table, "-S"], capture_output=True, text=True).stdout
            found += [f"{command} {table} {' '.join(step[1:])}" for step in network.node_chain_removal(listing)
                      if step[0] == "-X"]
    return found


def clean_network(kube_proxy: Path | None) -> None:
    """kube-proxy's rules (its own --cleanup, once it has stopped), then every other chain of the node's
    (the kubelet's, the firewall) in both address families: after the bridge is gone, so that no packet of
    a pod is ever forwarded without the firewall."""
    if kube_proxy is not None and kube_proxy_rules_present():
        subprocess.run(network.kube_proxy_cleanup_command(kube_proxy), capture_output=True, timeout=60)
    remove_firewall()
    for command in ("iptables", "ip6tables"):
        for table in network.IPTABLES_TABLES:
            listing = subprocess.run([command, "-w", "5", "-t", table, "-S"], capture_output=True, text=True).stdout
            for step in network.node_chain_removal(listing):
                subprocess.run([command, "-w", "5", "-t", table, *step], capture_output=True)
    for name in node_ipsets_present():
        subprocess.run(["ipset", "destroy", name], capture_output=True)


def node_ipsets_present() -> list[str]:
    try:
        listing = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True).stdout
    except FileNotFoundError:  # no ipset, so no kube-router either
        return []
    return network.node_ipsets(listing.split())


def kube_router_ready() -> bool:
    """kube-router has synced once: its FORWARD chain exists."""
    return _iptables("-t", "filter", "-S", network.KUBE_ROUTER_READY_CHAIN, check=False).returncode == 0


def socket_accepts(path: Path) -> bool:
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(str(path))
            return True
        except OSError:
            return False


def ctr(layout: NodeLayout, *args: str, check: bool = True) -> str:
    result = subprocess.run([str(CTR), "--address", str(layout.containerd_socket), "--namespace", CONTAINERD_NAMESPACE,
                             *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise NodeError(f"`ctr {' '.join(args)}` failed: {result.stderr.strip()}")
    return result.stdout


def remove_containers(layout: NodeLayout) -> set[str]:
    """Kill and delete every container of the node's containerd; returns their network namespaces."""
    if not socket_accepts(layout.containerd_socket):
        return set()
    ids = ctr(layout, "containers", "list", "--quiet", check=False).split()
    infos = []
    for container in ids:
        try:
            infos.append(json.loads(ctr(layout, "containers", "info", container)))
        except (NodeError, json.JSONDecodeError):
            pass
        ctr(layout, "tasks", "kill", "--signal", "SIGKILL", container, check=False)
    for container in ids:
        ctr(layout, "tasks", "delete", "--force", container, check=False)
        ctr(layout, "containers", "delete", container, check=False)
    return node.netns_paths(infos)


def kill_shims(layout: NodeLayout) -> None:
    """containerd's shims outlive it by design; the ones serving this node's containerd go too."""
    address = str(layout.containerd_socket)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if (proc.info["name"] or "").startswith("containerd-shim") and address in (proc.info["cmdline"] or []):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest (last mounted) first."""
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(str(root).rstrip("/") + "/"):
                points.append(point)
    return points[::-1]


def unmount(points: list[str]) -> None:
    for point in points:
        subprocess.run(["umount", "--lazy", point], capture_output=True)


def kill_cgroup_tree(directory: Path, timeout: float = 10.0) -> None:
    """SIGKILL every process left in a cgroup tree (containers whose containerd and shims are gone) and
    wait until they are gone."""
    deadline = time.monotonic() + timeout
    while directory.is_dir() and time.monotonic() < deadline:
        pids = [pid for procs in directory.rglob("cgroup.procs") for pid in procs.read_text().split()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def remove_cgroup_tree(directory: Path) -> None:
    """rmdir a cgroup and its descendants, deepest first (a cgroup dir can only be removed empty)."""
    if not directory.is_dir():
        return
    for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            child.rmdir()
        except OSError:
            pass
    try:
        directory.rmdir()
    except OSError:
        pass


def empty_pod_netns() -> set[str]:
    """containerd's pod network namespaces (`cni-*`) that no process is in any more: what a node whose
    containerd died (SIGKILL) leaves, since only containerd knew which were its own."""
    in_use = set()
    for link in Path("/proc").glob("[0-9]*/ns/net"):
        try:
            in_use.add(link.stat().st_ino)
        except OSError:
            pass
    return {str(path) for path in node.NETNS_DIR.glob("cni-*") if path.stat().st_ino not in in_use}


def clean_host(layout: NodeLayout, environment: Path, netns: set[str], kube_proxy: Path | None = None) -> None:
    """Everything else the node made, once its processes (containerd last) have stopped; the machine's
    node lock goes last, so that the next node's firewall is never the one removed here."""
    kill_shims(layout)
    hierarchies = list(CGROUP_ROOT.iterdir()) if CGROUP_ROOT.is_dir() else []
    for hierarchy in hierarchies:
        kill_cgroup_tree(hierarchy / KUBEPODS)
    netns = netns | empty_pod_netns()
    unmount([path for path in netns if Path(path).exists()])
    for path in netns:
        Path(path).unlink(missing_ok=True)
    unmount(mounts_under(layout.root))
    _ip("link", "delete", BRIDGE, check=False)
    clean_network(kube_proxy)
    for hierarchy in hierarchies:
        remove_cgroup_tree(hierarchy / KUBEPODS)
    for fixed in KUBELET_FIXED_SOCKETS:
        fixed.unlink(missing_ok=True)
    # The node agent removes its CSI plugin's sockets when it stops; a killed agent leaves them.
    for plugin_socket in (csi.plugin_socket(layout.kubelet_root), csi.registration_socket(layout.kubelet_root)):
        plugin_socket.unlink(missing_ok=True)
    for link in RUNTIME_SOCKET_DIR.glob("*/*.sock") if RUNTIME_SOCKET_DIR.is_dir() else ():
        if link.is_symlink() and str(os.readlink(link)).startswith(str(layout.root)):
            link.unlink()
    release(environment)
