"""Loads the node agent's BCC programs and drives their maps.

One program object per node agent: tracepoints (fork/exec/exit, OOM victims) attach to the whole host
and count only for cgroups present in `call_stats`; the `cgroup_skb` egress program attaches once to each
sandbox's cgroup (its calls inherit it) and enforces the policy stored for the call's cgroup id. Calls
therefore cost map updates, not attachments. Maps and attached programs are pinned in bpffs, so a node
agent that restarts finds and replaces what its predecessor left rather than stacking new copies.
"""

from __future__ import annotations

import ctypes as ct
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentkube.contract import MAX_ALLOW_RULES, ToolNetwork
from agentkube.ebpf import egress
from agentkube.ebpf.egress import IPAddress, IPNetwork, LpmKey, ResolvedEntry, Sender

PROGRAM_SOURCE = Path(__file__).parent / "programs" / "nodeagent.c"
BPFFS = Path("/sys/fs/bpf")
MAX_CALLS = egress.MAX_CALLS
BPF_F_ALLOW_MULTI = 2  # other programs (e.g. the container runtime's) may stay attached beside ours
CGROUP_INET_EGRESS = 1  # enum bpf_attach_type
PINNED_MAPS = ("policies", "call_stats", "resolved", "sandbox_cgroups")

EVENT_KINDS = {1: "exec", 2: "exit", 3: "oom", 4: "blocked"}
EVENTS_SWEEP_SECONDS = 0.05  # how often the reader thread empties the ring buffer (events do not wake it)


class Rule(ct.Structure):
    _fields_ = [("addr", ct.c_uint32 * 4), ("mask", ct.c_uint32 * 4), ("port", ct.c_uint16),
                ("family", ct.c_uint8), ("pad", ct.c_uint8)]


class Policy(ct.Structure):
    _fields_ = [("mode", ct.c_uint32), ("nrules", ct.c_uint32), ("rules", Rule * MAX_ALLOW_RULES)]


class CallStats(ct.Structure):
    _fields_ = [("forks", ct.c_uint64), ("execs", ct.c_uint64), ("exits", ct.c_uint64), ("ooms", ct.c_uint64),
                ("blocked_packets", ct.c_uint64), ("blocked_connections", ct.c_uint64), ("dns_refused", ct.c_uint64)]


class Event(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("timestamp_ns", ct.c_uint64), ("kind", ct.c_uint32),
                ("pid", ct.c_uint32), ("daddr", ct.c_uint32 * 4), ("dport", ct.c_uint16),
                ("family", ct.c_uint8), ("pad", ct.c_uint8), ("comm", ct.c_char * 16)]


def policy_struct(network: ToolNetwork) -> Policy:
    entry = egress.compile_policy(network)
    policy = Policy(mode=entry.mode, nrules=len(entry.rules))
    for i, rule in enumerate(entry.rules):
        policy.rules[i] = Rule((ct.c_uint32 * 4)(*rule.addr), (ct.c_uint32 * 4)(*rule.mask), rule.port, rule.family, 0)
    return policy


@dataclass
class CallEvent:
    cgroup_id: int
    kind: str
    pid: int
    timestamp_ns: int
    comm: str
    destination: str | None = None


def parse_event(raw: Event) -> CallEvent:
    destination = None
    if raw.kind == 4:
        address = egress.address_of(raw.family, list(raw.daddr))
        destination = f"[{address}]:{raw.dport}" if raw.family == 6 else f"{address}:{raw.dport}"
    return CallEvent(raw.cgroup_id, EVENT_KINDS.get(raw.kind, str(raw.kind)), raw.pid, raw.timestamp_ns,
                     raw.comm.decode(errors="replace"), destination)


class Programs:
    """The loaded programs of one node agent, whose pins live in BPFFS/<instance>."""

    def __init__(self, instance: str):
        from bcc import BPF  # Debian's python3-bpfcc (made importable by `make deps`)

        self.pin_dir = BPFFS / instance
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._pins = self.pin_dir / "egress"
        self._pins.mkdir(exist_ok=True)
        def load():
            bpf = BPF(src_file=str(PROGRAM_SOURCE).encode(),
                      cflags=[f'-DPIN_DIR="{self.pin_dir}"', *(f"-D{name}={value}" for name, value in egress.bpf_defines().items())])
            try:
                return bpf, bpf.load_func(b"egress", BPF.CGROUP_SKB)
            except Exception:
                bpf.cleanup()
                raise

        try:
            self.bpf, self.egress = load()
        except Exception as error:  # BCC raises plain Exceptions for a program the verifier refuses
            # Maps pinned by another version of these programs (another layout of a value) make the verifier
            # refuse this one. Their counters cannot be read by this version anyway: start with fresh maps.
            stale = [path for path in (self.pin_dir / name for name in PINNED_MAPS) if path.exists()]
            if not stale:
                raise
            print(f"node agent: {error}; replacing maps pinned by another version of the programs", flush=True)
            for path in stale:
                path.unlink()
            self.bpf, self.egress = load()
        self.policies = self.bpf[b"policies"]
        self.call_stats = self.bpf[b"call_stats"]
        self.resolved = self.bpf[b"resolved"]
        self.sandbox_cgroups = self.bpf[b"sandbox_cgroups"]
        self.dns_senders = self.bpf[b"dns_senders"]
        self.settings = self.bpf[b"settings"]
        self._tries = {name: self.bpf[name.encode()] for name in ("cluster_nets", "public_refused", "node_addrs")}
        self._trie_keys: dict[str, set[LpmKey]] = {name: set() for name in self._tries}
        self._sync_trie("public_refused", egress.refused_to_internet())
        # Resolved entries of each call (to remove them when it ends), rebuilt from the pinned map after a
        # restart; and the lookups the DNS answering refused, per call (the kernel counts those it drops).
        self._resolved_keys: dict[int, set[bytes]] = {}
        for key in self.resolved.keys():
            self._resolved_keys.setdefault(key.cgroup_id, set()).add(bytes(key))
        self._dns_refused: dict[int, int] = {}
        self._lib = __import__("bcc.libbcc", fromlist=["lib"]).lib
        self._lock = threading.Lock()
        self._events_lock = threading.Lock()  # one consumer of the ring buffer at a time
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # --- egress attachment, once per sandbox cgroup ---------------------------------------------------
    def attach_egress(self, cgroup_dir: Path, cgroup_id: int, main_id: int) -> None:
        """Attach the egress program to a sandbox cgroup, replacing the copy a previous node agent
        process attached (found through its pin), so exactly one of ours stays attached. The sandbox's own
        cgroups (it and its main leaf, `main_id`) are let through first: under the program, a socket of any
        other cgroup without a call's policy sends nothing."""
        for own in (cgroup_id, main_id):
            self.sandbox_cgroups[ct.c_uint64(own)] = ct.c_uint64(cgroup_id)
        pin = self._pins / str(cgroup_id)
        fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            res = self._lib.bpf_prog_attach(self.egress.fd, fd, CGROUP_INET_EGRESS, BPF_F_ALLOW_MULTI)
            if res < 0:
                raise OSError(-res, f"attaching egress program to {cgroup_dir}: {os.strerror(-res)}")
            self._detach_pinned(pin, fd)
            res = self._lib.bpf_obj_pin(self.egress.fd, str(pin).encode())
            if res < 0:
                raise OSError(-res, f"pinning egress program at {pin}")
        finally:
            os.close(fd)

    def detach_egress(self, cgroup_dir: Path, cgroup_id: int) -> None:
        pin = self._pins / str(cgroup_id)
        try:
            fd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            pin.unlink(missing_ok=True)  # the cgroup is gone and its attachments with it
        else:
            try:
                self._detach_pinned(pin, fd)
            finally:
                os.close(fd)
        self.forget_sandbox_cgroups(lambda sandbox_id: sandbox_id == cgroup_id)

    def forget_sandbox_cgroups(self, of: Callable[[int], bool]) -> None:
        """Remove the own-cgroup entries of the sandboxes `of` picks (by the sandbox cgroup's id)."""
        for key, value in list(self.sandbox_cgroups.items()):
            if of(value.value):
                try:
                    del self.sandbox_cgroups[key]
                except KeyError:
                    pass

    def _detach_pinned(self, pin: Path, cgroup_fd: int) -> None:
        if not pin.exists():
            return
        old = self._lib.bpf_obj_get(str(pin).encode())
        if old >= 0:
            try:
                self._lib.bpf_prog_detach2(old, cgroup_fd, CGROUP_INET_EGRESS)  # ENOENT: already detached
            finally:
                os.close(old)
        pin.unlink(missing_ok=True)

    def attached_sandboxes(self) -> set[int]:
        return {int(p.name) for p in self._pins.iterdir()}

    # --- per-call state -------------------------------------------------------------------------------
    def track(self, cgroup_id: int, network: ToolNetwork) -> None:
        """Start counting for a call's cgroup and enforce its egress policy (every call has an entry)."""
        key = ct.c_uint64(cgroup_id)
        self.call_stats[key] = CallStats()
        self.policies[key] = policy_struct(network)

    def set_policy(self, cgroup_id: int, network: ToolNetwork) -> None:
        """Replace a tracked cgroup's egress policy (a pooled call cgroup's `none`, by its call's network)."""
        self.policies[ct.c_uint64(cgroup_id)] = policy_struct(network)

    def stats(self, cgroup_id: int) -> CallStats:
        try:
            stats = CallStats.from_buffer_copy(bytes(self.call_stats[ct.c_uint64(cgroup_id)]))
        except KeyError:
            stats = CallStats()
        stats.dns_refused += self._dns_refused.get(cgroup_id, 0)
        return stats

    def untrack(self, cgroup_id: int) -> CallStats:
        """Stop counting and enforcing for a call; returns its final counters."""
        key = ct.c_uint64(cgroup_id)
        stats = self.stats(cgroup_id)
        for table in (self.policies, self.call_stats):
            try:
                del table[key]
            except KeyError:
                pass
        with self._lock:
            resolved = self._resolved_keys.pop(cgroup_id, set())
            self._dns_refused.pop(cgroup_id, None)
        for raw in resolved:
            try:
                del self.resolved[self.resolved.Key.from_buffer_copy(raw)]
            except KeyError:
                pass
        return stats

    def tracked(self) -> set[int]:
        return {key.value for key in self.call_stats.keys()}

    def policy_entries(self) -> set[int]:
        """Calls with map entries: a policy, or addresses their lookups opened."""
        with self._lock:
            return {key.value for key in self.policies.keys()} | set(self._resolved_keys)

    # --- the cluster's networks and the DNS answering ----------------------------------------------------
    def _sync_trie(self, name: str, wanted: set[LpmKey]) -> None:
        """Make an LPM trie hold exactly `wanted`: add first, then remove, so no moment admits less."""
        trie, current = self._tries[name], self._trie_keys[name]
        for entry in wanted - current:
            trie[self._lpm(trie, entry)] = ct.c_uint8(1)
        for entry in current - wanted:
            try:
                del trie[self._lpm(trie, entry)]
            except KeyError:
                pass
        self._trie_keys[name] = set(wanted)

    @staticmethod
    def _lpm(trie, entry: LpmKey):
        key = trie.Key()
        key.prefixlen = entry.prefixlen
        ct.memmove(ct.addressof(key.data), entry.data, len(entry.data))
        return key

    def set_cluster_networks(self, networks: tuple[IPNetwork, ...]) -> None:
        self._sync_trie("cluster_nets", egress.lpm_entries(networks))

    def set_node_addresses(self, addresses: set[IPAddress]) -> None:
        self._sync_trie("node_addrs", egress.node_address_entries(addresses))

    def set_dns_address(self, address: IPAddress | None, port: int = egress.DNS_PORT) -> None:
        """Where the DNS answering listens (None: nowhere; DNS packets are then judged like any other)."""
        value = self.settings.Leaf()
        if address is not None:
            value.dns_addr = (ct.c_uint32 * 4)(*egress.words(address.packed))
            value.dns_port = port
            value.dns_family = address.version
        self.settings[ct.c_int(0)] = value

    def dns_sender(self, sender: Sender) -> int | None:
        """The call whose DNS packet left from this source, as the egress program recorded it."""
        key = self.dns_senders.Key()
        key.addr = (ct.c_uint32 * 4)(*egress.words(sender.address.packed))
        key.port = sender.port
        key.family = sender.address.version
        key.proto = sender.protocol
        try:
            return self.dns_senders[key].value
        except KeyError:
            return None

    def allow_resolved(self, entries: list[ResolvedEntry]) -> None:
        """Let calls open addresses their allowed names resolved to (written before the answer is sent)."""
        for entry in entries:
            key = self.resolved.Key()
            key.cgroup_id = entry.cgroup_id
            key.addr = (ct.c_uint32 * 4)(*egress.words(entry.address.packed))
            key.port = entry.port
            key.family = entry.address.version
            with self._lock:  # against untrack: a call that ended while its lookup was in flight gets nothing
                if ct.c_uint64(entry.cgroup_id) not in self.policies:
                    continue
                self.resolved[key] = ct.c_uint64(entry.expires_ns)
                self._resolved_keys.setdefault(entry.cgroup_id, set()).add(bytes(key))

    def count_dns_refused(self, cgroup_id: int) -> None:
        with self._lock:
            self._dns_refused[cgroup_id] = self._dns_refused.get(cgroup_id, 0) + 1

    # --- the event ring buffer ------------------------------------------------------------------------
    @property
    def events_running(self) -> bool:
        """The event reader is alive: exec, exit and OOM events reach the agent."""
        return self._poller is not None and self._poller.is_alive()

    def start_events(self, handle: Callable[[CallEvent], None]) -> None:
        def callback(_ctx, data, _size):
            handle(parse_event(ct.cast(data, ct.POINTER(Event)).contents))

        self.bpf[b"events"].open_ring_buffer(callback)

        def poll():
            while not self._stop.wait(EVENTS_SWEEP_SECONDS):
                self.consume_events()

        self._poller = threading.Thread(target=poll, name="bpf-events", daemon=True)
        self._poller.start()

    def consume_events(self) -> None:
        """Hand every event in the ring buffer to the handler, in this thread. The events are submitted
        without waking anyone, so a finishing call reads its own (its exit is in the buffer before its
        parent could reap it) instead of waiting for a reader thread to be scheduled."""
        with self._events_lock:
            self.bpf.ring_buffer_consume()

    def close(self) -> None:
        """Stop polling and unload. Pinned maps and attachments stay for the next agent process."""
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=2)
        self.bpf.cleanup()

    def remove_pins(self) -> None:
        """Remove this instance's pins (maps and program pins); for an agent shutting down for good."""
        for path in (self.pin_dir / name for name in PINNED_MAPS):
            path.unlink(missing_ok=True)
        for pin in self._pins.iterdir():
            pin.unlink(missing_ok=True)
        for directory in (self._pins, self.pin_dir):
            try:
                directory.rmdir()
            except OSError:
                pass
