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
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agentkube.contract import MAX_ALLOW_RULES, ToolNetwork

PROGRAM_SOURCE = Path(__file__).parent / "programs" / "nodeagent.c"
BPFFS = Path("/sys/fs/bpf")
MAX_CALLS = 4096  # concurrent calls tracked per node agent (map capacity)
BPF_F_ALLOW_MULTI = 2  # other programs (e.g. the container runtime's) may stay attached beside ours
CGROUP_INET_EGRESS = 1  # enum bpf_attach_type

MODES = {"none": 1, "loopback": 2, "allowlist": 3}
EVENT_KINDS = {1: "exec", 2: "exit", 3: "oom", 4: "blocked"}


class Rule(ct.Structure):
    _fields_ = [("addr", ct.c_uint32 * 4), ("mask", ct.c_uint32 * 4), ("port", ct.c_uint16),
                ("family", ct.c_uint8), ("pad", ct.c_uint8)]


class Policy(ct.Structure):
    _fields_ = [("mode", ct.c_uint32), ("nrules", ct.c_uint32), ("rules", Rule * MAX_ALLOW_RULES)]


class CallStats(ct.Structure):
    _fields_ = [("forks", ct.c_uint64), ("execs", ct.c_uint64), ("exits", ct.c_uint64), ("ooms", ct.c_uint64),
                ("blocked_packets", ct.c_uint64), ("blocked_connections", ct.c_uint64)]


class Event(ct.Structure):
    _fields_ = [("cgroup_id", ct.c_uint64), ("timestamp_ns", ct.c_uint64), ("kind", ct.c_uint32),
                ("pid", ct.c_uint32), ("daddr", ct.c_uint32 * 4), ("dport", ct.c_uint16),
                ("family", ct.c_uint8), ("pad", ct.c_uint8), ("comm", ct.c_char * 16)]


def _words(packed: bytes) -> list[int]:
    """16 bytes in packet order → four u32 whose in-memory bytes are those bytes (what the program loads)."""
    padded = packed.ljust(16, b"\0")
    return [int.from_bytes(padded[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]


def policy_values(network: ToolNetwork) -> tuple[int, list[tuple[list[int], list[int], int, int]]]:
    """(mode, [(addr words, mask words, port, family)]) for the policy map. Every call has an entry: the
    pod's loopback only for `none`, the address rules for `explicit`; modes this program cannot express
    yet get no rule at all (fail closed)."""
    if network.egress == "none":
        return MODES["loopback"], []
    rules = [
        (_words(rule.network.network_address.packed), _words(rule.network.netmask.packed), rule.port or 0,
         rule.network.version)
        for rule in network.allow if rule.cidr is not None
    ]
    return MODES["allowlist"], rules


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
        data = b"".join(w.to_bytes(4, sys.byteorder) for w in raw.daddr)
        import ipaddress

        address = ipaddress.IPv4Address(data[:4]) if raw.family == 4 else ipaddress.IPv6Address(data)
        destination = f"{address}:{raw.dport}"
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
        self.bpf = BPF(
            src_file=str(PROGRAM_SOURCE).encode(),
            cflags=[f'-DPIN_DIR="{self.pin_dir}"', f"-DMAX_RULES={MAX_ALLOW_RULES}", f"-DMAX_CALLS={MAX_CALLS}"],
        )
        self.egress = self.bpf.load_func(b"egress", BPF.CGROUP_SKB)
        self.policies = self.bpf[b"policies"]
        self.call_stats = self.bpf[b"call_stats"]
        self._lib = __import__("bcc.libbcc", fromlist=["lib"]).lib
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # --- egress attachment, once per sandbox cgroup ---------------------------------------------------
    def attach_egress(self, cgroup_dir: Path, cgroup_id: int) -> None:
        """Attach the egress program to a sandbox cgroup, replacing the copy a previous node agent
        process attached (found through its pin), so exactly one of ours stays attached."""
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
            return
        try:
            self._detach_pinned(pin, fd)
        finally:
            os.close(fd)

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
        """Start counting for a call's cgroup and enforce its egress policy."""
        key = ct.c_uint64(cgroup_id)
        self.call_stats[key] = CallStats()
        mode, rules = policy_values(network)
        entry = Policy(mode=mode, nrules=len(rules))
        for i, (addr, mask, port, family) in enumerate(rules):
            entry.rules[i] = Rule((ct.c_uint32 * 4)(*addr), (ct.c_uint32 * 4)(*mask), port, family, 0)
        self.policies[key] = entry

    def stats(self, cgroup_id: int) -> CallStats:
        try:
            return self.call_stats[ct.c_uint64(cgroup_id)]
        except KeyError:
            return CallStats()

    def untrack(self, cgroup_id: int) -> CallStats:
        """Stop counting and enforcing for a call; returns its final counters."""
        key = ct.c_uint64(cgroup_id)
        stats = self.stats(cgroup_id)
        for table in (self.policies, self.call_stats):
            try:
                del table[key]
            except KeyError:
                pass
        return CallStats.from_buffer_copy(bytes(stats))

    def tracked(self) -> set[int]:
        return {key.value for key in self.call_stats.keys()}

    def policy_entries(self) -> set[int]:
        return {key.value for key in self.policies.keys()}

    # --- the event ring buffer ------------------------------------------------------------------------
    def start_events(self, handle: Callable[[CallEvent], None]) -> None:
        def callback(_ctx, data, _size):
            handle(parse_event(ct.cast(data, ct.POINTER(Event)).contents))

        self.bpf[b"events"].open_ring_buffer(callback)

        def poll():
            while not self._stop.is_set():
                self.bpf.ring_buffer_poll(200)

        self._poller = threading.Thread(target=poll, name="bpf-events", daemon=True)
        self._poller.start()

    def close(self) -> None:
        """Stop polling and unload. Pinned maps and attachments stay for the next agent process."""
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=2)
        self.bpf.cleanup()

    def remove_pins(self) -> None:
        """Remove this instance's pins (maps and program pins); for an agent shutting down for good."""
        for path in (self.pin_dir / "policies", self.pin_dir / "call_stats"):
            path.unlink(missing_ok=True)
        for pin in self._pins.iterdir():
            pin.unlink(missing_ok=True)
        for directory in (self._pins, self.pin_dir):
            try:
                directory.rmdir()
            except OSError:
                pass
