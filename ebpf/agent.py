"""The node agent: sandboxes, one cgroup per tool call, enforcement and accounting.

State that must survive a restart (sandboxes, running calls, command history) is written to the state
directory before it matters (a call's record before its process is moved), and BPF maps are pinned, so
a restarted agent picks up running calls, their deadlines and their counters, and sweeps any cgroup or
map entry no record accounts for.
"""

from __future__ import annotations

import fcntl
import json
import os
import queue
import resource
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from agentkube.contract import (
    CALL_PREFIX,
    HISTORY_WINDOW,
    CallIntent,
    Limits,
    OutOfEnvelope,
    ToolNetwork,
    command_signature,
    resolve_limits,
)
from agentkube.ebpf.bpf import CallEvent, Programs
from agentkube.ebpf.cgroups import (
    MAIN_LEAF,
    UNIFIED,
    Cgroup,
    CgroupError,
    CgroupLayout,
    OpenCounters,
    detect_layout,
    favors_dynmods,
    is_within,
    kubernetes_container_paths,
    local_root_paths,
    own_cgroups,
    parse_proc_cgroup,
    set_favor_dynmods,
)
from agentkube.ebpf.deadlines import Deadlines
from agentkube.ebpf.frames import take_received_fd
from agentkube.ebpf.held import RELEASE
from agentkube.ebpf.kernelfiles import read_text, write_text
from agentkube.ebpf.metrics import Metrics, call_totals
from agentkube.ebpf.models import (
    UNREGISTERED,
    CallCreate,
    CallFinish,
    CallPlaced,
    CallRecord,
    CallStart,
    PoolFill,
    PoolSlot,
    SandboxCreate,
    SandboxRef,
    SandboxStatus,
    Usage,
)
from agentkube.ebpf.netconfig import EgressConfig, EgressServices  # egress: cluster networks, DNS answering
from agentkube.ebpf.pressure import PressureWatcher, high_events_seen
from agentkube.ebpf.unixhttp import HttpError, Peer

MAX_RUNNING_CALLS = 1024
FINISH_GRACE_SECONDS = 30.0  # after a deadline kill, how long the runtime has to report before the agent closes the call itself
FINISHED_KEPT = 512  # finished records answered again to a runtime that retries its finish
EXECUTED_KEPT = 64  # programs a call executed, kept in its audit record
HISTORY_SAVE_INTERVAL = 1.0
POOL_SLOTS_PER_SANDBOX = 4  # warm call cgroups a sandbox's runtime may keep waiting (each holds one process)
# An ended call's cgroup serves a later call of its sandbox (no mkdir, open or rmdir per call, nor the kernel's
# making and tearing down of a memory cgroup) only if its call left at most this charged to it, page cache
# mostly: the next call's memory limit and peak count what stays charged. A call that left more, was killed
# at its deadline or left processes behind gets its cgroup removed, as every call's was before.
SPARE_CHARGE_BYTES = 4 << 20
# A tool call's processes are the kernel's first choice when memory runs out, in the sandbox, on the node or
# under any budget above them: a call is one command the agent can run again, its sandbox's main process
# (the runtime, the agent's session) is not. Written before the call's first instruction by an agent with
# CAP_SYS_RESOURCE (the chart's DaemonSet), it also becomes the floor an unprivileged process may lower it
# to, so a call cannot make itself a worse victim (without the capability the kernel keeps the old floor);
# its children inherit it. The largest call goes first (equal adjustments leave the choice to size).
CALL_OOM_SCORE_ADJ = 1000


def sandbox_containing(cgroup_path: str, sandboxes: dict[str, str]) -> str | None:
    """Which sandbox (key → its unified cgroup path) a cgroup path lies in, if any."""
    for key, path in sandboxes.items():
        if is_within(cgroup_path, path):
            return key
    return None


def read_ppid(pid: int) -> int:
    for line in read_text(f"/proc/{pid}/status").splitlines():
        if line.startswith("PPid:"):
            return int(line.split()[1])
    raise ProcessLookupError(pid)


def innermost_pid(status_text: str) -> int | None:
    """A process's PID in its own (innermost) PID namespace, from /proc/PID/status's NSpid line."""
    for line in status_text.splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None


def host_pid(pid: int, peer_pid: int, candidates: set[int]) -> int:
    """The node's PID of the caller's child `pid` as the caller sees it. A runtime in a container speaks in
    its container's PID namespace; the child is among `candidates` (its sandbox's processes)."""
    if os.readlink(f"/proc/{peer_pid}/ns/pid") == os.readlink("/proc/self/ns/pid"):
        return pid
    for candidate in candidates:
        try:
            if innermost_pid(read_text(f"/proc/{candidate}/status")) == pid and read_ppid(candidate) == peer_pid:
                return candidate
        except (FileNotFoundError, ProcessLookupError):
            continue
    raise HttpError(404, f"no process {pid} among the caller's children")


def traced_by(status_text: str) -> int:
    """The PID tracing a process (0: none), from /proc/PID/status."""
    for line in status_text.splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    return 0


def check_release_pipe(fd: int) -> None:
    """A held process's release pipe as the runtime hands it over: the write end of a pipe. Made non-blocking,
    so that a pipe someone filled can never hold up the agent's thread."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_WRONLY:
        raise HttpError(400, "the descriptor sent with fill is not the write end of a pipe")
    os.set_blocking(fd, False)


def release_held(fd: int) -> None:
    """Let a held process read its command and exec it (one byte on its release pipe), and close the pipe. A
    process that died meanwhile (the pipe broken) leaves a call that ends as it did."""
    try:
        os.write(fd, RELEASE)
    except (BrokenPipeError, BlockingIOError):
        pass
    finally:
        os.close(fd)


def raise_open_files_limit() -> None:
    """Every waiting call cgroup keeps descriptors open here (its release pipe, record and counter files):
    the soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def prefer_as_oom_victim(pid: int) -> None:
    """Make a call's first process (and so every process it starts) the kernel's preferred OOM victim."""
    write_text(f"/proc/{pid}/oom_score_adj", str(CALL_OOM_SCORE_ADJ))


def unified_cgroup_of(pid: int) -> str:
    try:
        return parse_proc_cgroup(read_text(f"/proc/{pid}/cgroup"))[UNIFIED]
    except FileNotFoundError:
        raise HttpError(404, f"no process {pid}") from None


@dataclass
class Sandbox:
    spec: SandboxCreate
    cgroup: Cgroup
    main: Cgroup
    last_activity: float = field(default_factory=time.time)
    totals: Counter = field(default_factory=Counter)  # call totals since it was registered (call_totals)
    closing: bool = False  # set, with its pool taken, when it is unregistered: no cgroup may join its pool after
    making: int = 0  # refills making a call cgroup under it right now (its removal waits for them)
    # The limits its latest call started with: a refill's cgroup gets these rather than the defaults, since an
    # agent tends to ask for the same again (a test run after a test run), and a call whose limits its waiting
    # cgroup already holds writes no limit file when it starts. Resolved within the envelope, like any call's.
    recent_limits: Limits | None = None
    spares: list[SpareCgroup] = field(default_factory=list)  # its ended calls' empty cgroups, for its next fills
    # Its cgroup's v2 id, taken while the directory exists: its egress program's pin and its own cgroups'
    # entries are found by it after the kubelet has removed a pod's cgroup.
    cgroup_id: int = field(init=False)

    def __post_init__(self) -> None:
        self.cgroup_id = self.cgroup.id

    @property
    def key(self) -> str:
        return self.spec.key


@dataclass
class SpareCgroup:
    """An ended call's cgroup, empty and untracked, kept for a later fill of its sandbox (SPARE_CHARGE_BYTES)."""

    cgroup: Cgroup
    cgroup_id: int
    limits: Limits  # what its limit files hold: its last call's
    counters: OpenCounters  # still open; restarted for the next call


@dataclass
class PooledCgroup:
    """A call cgroup made (or an ended call's taken again, SpareCgroup) ahead of its call, with the runtime's
    held process already in it: it carries the limits of the sandbox's latest call (its defaults before the
    first) and a `none` egress policy until a call starts in it, and serves that one call (then it is removed,
    or kept empty as a spare for a later fill)."""

    call_id: str
    sandbox_key: str
    cgroup: Cgroup
    cgroup_id: int
    pid: int  # the held process, as the node sees it
    limits: Limits  # what its limit files hold
    # The write end of the held process's release pipe (held.c's fd 5), handed over with the fill: the agent
    # alone can release it, at its call's start, once everything the call runs under is in place.
    release: int = -1
    # Its call's write-ahead record, opened (empty) at fill: a start writes the record in one write(2). An
    # empty or unreadable record is a call that never started (the agent died before its start was answered,
    # so the process was never released): a restarted agent removes it, and its sweep the cgroup.
    record_fd: int = -1
    counters: OpenCounters | None = None  # its counter files and membership, open until its call ends


class NodeAgent:
    def __init__(self, state_dir: Path, instance: str = "agentkube", layout: CgroupLayout | None = None,
                 audit_log: Path | None = None, favor_dynmods: bool = False, local: bool = True,
                 egress: EgressConfig | None = None):
        self.state_dir = Path(state_dir)
        self.instance = instance
        self.local = local  # sandboxes are cgroups this agent makes (else: Kubernetes containers' cgroups)
        self.layout = layout or detect_layout()
        self.audit_log = audit_log or self.state_dir / "audit.jsonl"
        self.root = Cgroup(self.layout, local_root_paths(self.layout, own_cgroups(), instance))
        if favor_dynmods and not favors_dynmods(self.layout):
            try:
                set_favor_dynmods(self.layout, True)
            except subprocess.CalledProcessError as error:
                # A speed setting (kernels before 6.0 lack it): calls still run, each move pays the wait.
                print(f"node agent: cannot remount {self.layout.unified.mount} with favordynmods, so every "
                      f"process move waits for an RCU grace period: {error.stderr.strip()}", flush=True)
        self.metrics = Metrics()
        self.sandboxes: dict[str, Sandbox] = {}
        # Sandboxes whose tool intent cannot be honoured (Kubernetes mode): key -> why. None of their calls runs.
        self.refused: dict[str, str] = {}
        self.running: dict[str, CallRecord] = {}
        self.pools: dict[str, dict[str, PooledCgroup]] = {}  # sandbox key -> call id -> its waiting cgroup
        self.finished: OrderedDict[str, CallRecord] = OrderedDict()
        self.history: dict[str, deque[int]] = {}
        self.executed: dict[str, list[str]] = {}
        self._by_cgroup: dict[int, str] = {}
        self._counters: dict[str, OpenCounters] = {}  # running pooled call -> its open counter files
        self.deadlines = Deadlines()
        self._removals: queue.Queue[Cgroup | None] = queue.Queue()
        self._remover = threading.Thread(target=self._remove_cgroups, name="cgroup-remover", daemon=True)
        self._remover.start()
        self._lock = threading.RLock()
        self._made = threading.Condition(self._lock)  # a refill's call cgroup made (Sandbox.making)
        self._stopped = False
        self._audit: int | None = None  # the audit log, kept open for appending
        self._history_saved = 0.0
        self._history_dirty = False
        raise_open_files_limit()
        for folder in ("sandboxes", "calls"):
            (self.state_dir / folder).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.programs = Programs(instance)
        self.pressure = PressureWatcher(self._on_memory_high)
        self.root.create(delegate=True)
        self._recover()
        self.programs.start_events(self._on_event)
        self.metrics.bpf_loaded.set_function(lambda: float(self.programs.events_running))
        self.metrics.sandboxes.set_function(lambda: len(self.sandboxes))
        # egress: the cluster's networks and node addresses into the program's tries; DNS answering.
        self.egress = EgressServices(egress or EgressConfig(), self.programs, self._call_network)

    # --- who is calling -------------------------------------------------------------------------------
    def _sandbox_paths(self) -> dict[str, str]:
        return {key: sandbox.cgroup.unified_path for key, sandbox in self.sandboxes.items()}

    def require_admin(self, peer: Peer) -> None:
        if peer.uid != 0:
            raise HttpError(403, f"uid {peer.uid} may not manage sandboxes (root only)")
        inside = sandbox_containing(unified_cgroup_of(peer.pid), self._sandbox_paths())
        if inside:
            raise HttpError(403, f"a process inside sandbox {inside} may not manage sandboxes")

    def require_runtime(self, peer: Peer, sandbox: Sandbox) -> None:
        """Only the sandbox's runtime places, finishes and reads its calls. It lives in the sandbox's main
        leaf; a tool call's processes live in their call cgroup and can never move out of it, so code
        running inside a call cannot ask for anything here, for its own sandbox or for any other."""
        where = unified_cgroup_of(peer.pid)
        if where == sandbox.main.unified_path:
            return
        if is_within(where, sandbox.cgroup.unified_path):
            raise HttpError(403, f"caller pid {peer.pid} runs inside a tool call of sandbox {sandbox.key}: only the "
                                 "sandbox's runtime may ask the node agent for anything")
        raise HttpError(403, f"caller pid {peer.pid} is not the runtime of sandbox {sandbox.key}")

    def runtime_sandbox(self, peer: Peer, memo: dict, ref: SandboxRef) -> Sandbox:
        """The sandbox `ref`, once its runtime is known to be the peer of a framed connection. Checked once per
        connection and sandbox: the connection stays the process's that opened it (see frames.py), and a
        process's cgroup changes only by root's hand."""
        sandbox = self.sandbox(ref)
        if memo.get(("runtime", sandbox.key)) is not sandbox:
            self.require_runtime(peer, sandbox)
            memo[("runtime", sandbox.key)] = sandbox
        return sandbox

    def require_runtime_or_admin(self, peer: Peer, sandbox: Sandbox) -> None:
        if unified_cgroup_of(peer.pid) != sandbox.main.unified_path:
            self.require_admin(peer)

    def sandbox(self, ref: SandboxRef) -> Sandbox:
        try:
            return self.sandboxes[ref.key]
        except KeyError:
            if ref.key in self.refused:
                raise HttpError(422, f"sandbox {ref.key}: the node agent cannot honour its tool intent, so none of "
                                     f"its calls runs: {self.refused[ref.key]}") from None
            raise HttpError(404, f"{UNREGISTERED} {ref.key} on this node") from None

    # --- sandboxes ------------------------------------------------------------------------------------
    def create_sandbox(self, peer: Peer, spec: SandboxCreate) -> SandboxStatus:
        self.require_admin(peer)
        return self.register(spec)

    def register(self, spec: SandboxCreate) -> SandboxStatus:
        """Make a sandbox (the API's create, and the Kubernetes mode's pod watcher, come here)."""
        if self.local != (spec.kubernetes is None):
            raise HttpError(422, "this node agent runs with --local: a sandbox is a cgroup it makes (no kubernetes "
                                 "field)" if self.local else "this node agent serves Kubernetes pods: give the "
                                 "sandbox's kubernetes: {pod_uid, container_id, qos}")
        with self._lock:
            if spec.key in self.sandboxes:
                raise HttpError(409, f"sandbox {spec.key} exists")
            if spec.kubernetes:
                cgroup = self._kubernetes_cgroup(spec)
            else:
                cgroup = self.root.child(f"{spec.namespace}_{spec.name}")
                cgroup.create(delegate=True)
                cgroup.set_envelope(spec.envelope.envelope())
            main = cgroup.child(MAIN_LEAF)
            main.create()
            if spec.kubernetes:
                # No process may stay in a cgroup whose controllers are delegated (v2): the container's own
                # processes move to the leaf before any call cgroup appears beside it.
                for pid in cgroup.pids() - main.pids():
                    try:
                        main.add_process(pid)
                    except (ProcessLookupError, CgroupError):
                        pass
                cgroup.create(delegate=True)
            if spec.pid:
                if not Path(f"/proc/{spec.pid}").exists():
                    cgroup.remove()
                    raise HttpError(404, f"no process {spec.pid}")
                main.add_process(spec.pid)
            sandbox = Sandbox(spec, cgroup, main)
            self.programs.attach_egress(cgroup.unified_dir, sandbox.cgroup_id, main.id)
            self.sandboxes[spec.key] = sandbox
            self._save_sandbox(sandbox)
        return self.status(sandbox)

    def _kubernetes_cgroup(self, spec: SandboxCreate) -> Cgroup:
        k8s = spec.kubernetes
        assert k8s is not None  # only a Kubernetes sandbox comes here
        for candidate in kubernetes_container_paths(k8s.pod_uid, k8s.container_id, k8s.qos):
            cgroup = Cgroup(self.layout, {h.name: candidate for h in self.layout.hierarchies})
            if cgroup.exists():
                return cgroup  # delegated once its processes are in the leaf
        raise HttpError(404, f"no cgroup for container {k8s.container_id} of pod {k8s.pod_uid} on this node")

    def status(self, sandbox: Sandbox) -> SandboxStatus:
        return SandboxStatus(
            name=sandbox.spec.name, namespace=sandbox.spec.namespace, cgroup=sandbox.cgroup.unified_path,
            envelope=sandbox.spec.envelope.envelope(),
            defaults=resolve_limits(CallIntent(), (), sandbox.spec.tools, sandbox.spec.envelope.envelope()).limits,
            running_calls=sum(1 for r in self.running.values() if f"{r.namespace}/{r.sandbox}" == sandbox.key),
            last_activity=sandbox.last_activity,
        )

    def delete_sandbox(self, peer: Peer, ref: SandboxRef) -> None:
        self.require_admin(peer)
        self.unregister(ref)

    def unregister(self, ref: SandboxRef) -> None:
        sandbox = self.sandbox(ref)
        for call_id in [c for c, r in self.running.items() if f"{r.namespace}/{r.sandbox}" == sandbox.key]:
            self.finalize(call_id, CallFinish())
        with self._lock:
            sandbox.closing = True
            pooled = list(self.pools.pop(sandbox.key, {}).values())
            spares, sandbox.spares = sandbox.spares, []
            # A refill's mkdir under the sandbox between the removal's look at its children and its own rmdir
            # would keep the sandbox's directories for ever: wait for those in flight (no new one starts now).
            self._made.wait_for(lambda: sandbox.making == 0)
        for slot in pooled:  # the waiting cgroups go with their sandbox, held processes killed
            self._discard(slot)
        for spare in spares:
            spare.counters.close()
            self._removals.put(spare.cgroup)
        with self._lock:
            # A pod's cgroup goes with its container (the kernel detaches the programs then; its pin and
            # own-cgroup entries are ours to remove).
            self.programs.detach_egress(sandbox.cgroup.unified_dir, sandbox.cgroup_id)
            if sandbox.cgroup.exists():
                if sandbox.spec.kubernetes:
                    sandbox.main.kill()  # the container's processes; its cgroup belongs to the kubelet
                else:
                    sandbox.cgroup.remove()
            del self.sandboxes[sandbox.key]
            (self.state_dir / "sandboxes" / f"{sandbox.spec.namespace}_{sandbox.spec.name}.json").unlink(missing_ok=True)
            self.metrics.forget_sandbox(sandbox.spec.name, sandbox.spec.namespace)

    def _save_sandbox(self, sandbox: Sandbox) -> None:
        data = {"spec": sandbox.spec.model_dump(mode="json"), "paths": sandbox.cgroup.paths}
        _atomic_write(self.state_dir / "sandboxes" / f"{sandbox.spec.namespace}_{sandbox.spec.name}.json", json.dumps(data))

    # --- calls ----------------------------------------------------------------------------------------
    def place_call(self, peer: Peer, request: CallCreate) -> CallPlaced:
        with self.metrics.placement.time():
            return self._place_call(peer, request)

    def _place_call(self, peer: Peer, request: CallCreate) -> CallPlaced:
        sandbox = self.sandbox(request)
        self.require_runtime(peer, sandbox)
        request = request.model_copy(update={"pid": host_pid(request.pid, peer.pid, sandbox.main.pids())})
        target = unified_cgroup_of(request.pid)
        if target != sandbox.main.unified_path:
            raise HttpError(403, f"pid {request.pid} is not a process of sandbox {sandbox.key} outside any call")
        if read_ppid(request.pid) != peer.pid:
            raise HttpError(403, f"pid {request.pid} is not a child of the caller (pid {peer.pid})")
        if len(self.running) >= MAX_RUNNING_CALLS:
            raise HttpError(429, f"{MAX_RUNNING_CALLS} calls are running on this node; retry later")
        signature = command_signature(request.argv)
        history_key = f"{sandbox.key}\t{signature}"
        try:
            resolved = resolve_limits(request.intent, list(self.history.get(history_key, ())),
                                      sandbox.spec.tools, sandbox.spec.envelope.envelope())
        except OutOfEnvelope as error:
            raise HttpError(422, str(error)) from None
        limits = resolved.limits
        call_id = uuid.uuid4().hex[:16]
        cgroup = self._call_cgroup(sandbox, call_id)
        now = time.time()
        record = CallRecord(
            call_id=call_id, sandbox=sandbox.spec.name, namespace=sandbox.spec.namespace,
            profile=request.intent.profile or "none", signature=signature, argv=request.argv, pid=request.pid,
            cgroup_paths=cgroup.paths, cgroup_id=cgroup.id, limits=limits, sources=resolved.sources,
            started_at=now, deadline=now + limits.timeout,
        )
        try:
            cgroup.apply(limits)
            self._save_call(record)  # before the process moves: a restart finds the call from here on
            with self._lock:
                self.running[call_id] = record
                self._by_cgroup[record.cgroup_id] = call_id
            self.programs.track(record.cgroup_id, limits.network)
            self.pressure.watch(call_id, cgroup, limits.memory_high)
            prefer_as_oom_victim(request.pid)
            cgroup.add_process(request.pid)
        except BaseException:
            self._forget(record)
            cgroup.remove()
            raise
        sandbox.last_activity = now
        self.metrics.started(record.sandbox, record.namespace, now)
        self._arm(record)
        return CallPlaced(call_id=call_id, cgroup=cgroup.unified_path, limits=limits, sources=resolved.sources)

    # --- the warm pool: call cgroups made, and their first process placed, before the call ----------------
    def fill_pool(self, peer: Peer, request: PoolFill, memo: dict | None = None) -> PoolSlot:
        """Make a call cgroup for a call to come, with the runtime's held process in it (off the call's path:
        the directories, the limits, the BPF entries and the process move, which waits for an RCU grace
        period, are done here). The process gets the sandbox's default limits and no network meanwhile. The
        frame carries the held process's release pipe: the agent releases it at the call's start."""
        release = take_received_fd(memo) if memo is not None else None
        try:
            return self._fill_pool(peer, request, {} if memo is None else memo, release)
        except BaseException:
            if release is not None:
                os.close(release)
            raise

    def _fill_pool(self, peer: Peer, request: PoolFill, memo: dict, release: int | None) -> PoolSlot:
        sandbox = self.runtime_sandbox(peer, memo, request)
        if release is None:
            raise HttpError(400, "fill needs the held process's release pipe, sent with the frame")
        check_release_pipe(release)
        pid = host_pid(request.pid, peer.pid, sandbox.main.pids())
        if unified_cgroup_of(pid) != sandbox.main.unified_path:
            raise HttpError(403, f"pid {request.pid} is not a process of sandbox {sandbox.key} outside any call")
        if read_ppid(pid) != peer.pid:
            raise HttpError(403, f"pid {request.pid} is not a child of the caller (pid {peer.pid})")
        # The held process makes itself non-dumpable before it says it is ready, so nobody can attach from
        # then on; one attached before that would still be tracing it.
        if traced_by(read_text(f"/proc/{pid}/status")):
            raise HttpError(403, f"pid {request.pid} is being traced: it cannot wait for a call")
        with self._lock:
            if len(self.pools.get(sandbox.key, {})) >= POOL_SLOTS_PER_SANDBOX:
                raise HttpError(429, f"sandbox {sandbox.key} has {POOL_SLOTS_PER_SANDBOX} call cgroups waiting already")
            if len(self.running) + sum(map(len, self.pools.values())) >= MAX_RUNNING_CALLS:
                raise HttpError(429, f"{MAX_RUNNING_CALLS} calls are running or waiting on this node; retry later")
        limits = sandbox.recent_limits or \
            resolve_limits(CallIntent(), (), sandbox.spec.tools, sandbox.spec.envelope.envelope()).limits
        call_id = uuid.uuid4().hex[:16]
        with self._lock:
            if sandbox.closing:
                raise HttpError(404, f"{UNREGISTERED} {sandbox.key} on this node")
            spare = sandbox.spares.pop() if sandbox.spares else None
            if spare is None:
                sandbox.making += 1
        if spare is None:
            try:
                cgroup = self._call_cgroup(sandbox, call_id)
            finally:
                with self._made:
                    sandbox.making -= 1
                    self._made.notify_all()
            slot = PooledCgroup(call_id, sandbox.key, cgroup, cgroup.id, pid, limits, release)
        else:
            cgroup = spare.cgroup
            slot = PooledCgroup(call_id, sandbox.key, cgroup, spare.cgroup_id, pid, limits, release,
                                counters=spare.counters)
        try:
            slot.record_fd = os.open(self._record_path(call_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            if slot.counters:
                slot.counters.restart()
            else:
                slot.counters = cgroup.open_counters()
            cgroup.apply(limits, previous=spare.limits if spare else None)
            # No call yet: nothing may leave. A cgroup the agent knows no call for is removed by its sweep
            # after a restart (its process killed), so a pool needs no record on disk.
            self.programs.track(slot.cgroup_id, ToolNetwork(egress="none"))
            prefer_as_oom_victim(pid)
            cgroup.add_process(pid)
            if not self._wait_in_pool(sandbox, slot):
                raise HttpError(404, f"{UNREGISTERED} {sandbox.key} on this node")
        except BaseException:
            slot.release = -1  # fill_pool closes it
            self._discard(slot)
            raise
        return PoolSlot(call_id=call_id, cgroup=cgroup.unified_path)

    def start_call(self, peer: Peer, request: CallStart, memo: dict | None = None) -> CallPlaced:
        """Start a call in a cgroup of the pool: check it still holds its held process and nothing else, give
        it the call's limits and network, record the call (write-ahead), release the process (the runtime wrote
        its command before it asked) and answer, so that the command runs while the answer travels. A cgroup
        serves this one call: it leaves the pool here, whatever happens next; refused, it is discarded (its process
        holds the refused command)."""
        sandbox = self.runtime_sandbox(peer, {} if memo is None else memo, request)
        with self._lock:
            slot = self.pools.get(sandbox.key, {}).pop(request.call_id, None)
        if slot is None:
            raise HttpError(404, f"no waiting call cgroup {request.call_id} in sandbox {sandbox.key}")
        try:
            members = slot.counters.members() if slot.counters else []
        except OSError:  # its cgroup removed behind the agent's back
            members = []
        if members != [str(slot.pid)]:
            self._discard(slot)
            raise HttpError(409, f"call cgroup {request.call_id} holds {members or 'nothing'} instead of its held "
                                 f"process {slot.pid}: discarded")
        signature = command_signature(request.argv)
        try:
            resolved = resolve_limits(request.intent, list(self.history.get(f"{sandbox.key}\t{signature}", ())),
                                      sandbox.spec.tools, sandbox.spec.envelope.envelope())
        except OutOfEnvelope as error:
            self._discard(slot)
            raise HttpError(422, str(error)) from None
        limits = resolved.limits
        now = time.time()
        record = CallRecord(
            call_id=slot.call_id, sandbox=sandbox.spec.name, namespace=sandbox.spec.namespace,
            profile=request.intent.profile or "none", signature=signature, argv=request.argv, pid=slot.pid,
            cgroup_paths=slot.cgroup.paths, cgroup_id=slot.cgroup_id, limits=limits, sources=resolved.sources,
            started_at=now, deadline=now + limits.timeout,
        )
        try:
            slot.cgroup.apply(limits, previous=slot.limits)
            # Before the process is released: a restart finds the call from here on.
            self._write_record(slot, record.model_dump_json().encode())
            with self._lock:
                self.running[record.call_id] = record
                self._by_cgroup[record.cgroup_id] = record.call_id
                if slot.counters:
                    self._counters[record.call_id], slot.counters = slot.counters, None
            self.programs.set_policy(record.cgroup_id, limits.network)
            self.pressure.watch(record.call_id, slot.cgroup, limits.memory_high)
        except BaseException:
            self._forget(record)
            self._discard(slot)
            raise
        sandbox.last_activity = now
        sandbox.recent_limits = limits
        self.metrics.started(record.sandbox, record.namespace, now)
        self._arm(record)
        # Limits, the write-ahead record, the egress policy and the deadline are in place: the command may run.
        release, slot.release = slot.release, -1
        release_held(release)
        return CallPlaced(call_id=record.call_id, cgroup=slot.cgroup.unified_path, limits=limits,
                          sources=resolved.sources)

    def _call_cgroup(self, sandbox: Sandbox, call_id: str) -> Cgroup:
        """A new call cgroup under the sandbox's. Never makes the sandbox's own directories again: once they
        are removed (the sandbox unregistered meanwhile), a call cgroup there would have none of its limits."""
        cgroup = sandbox.cgroup.child(CALL_PREFIX + call_id)
        try:
            cgroup.create(parents=False)
        except FileNotFoundError:
            cgroup.remove()  # what was made in the hierarchies where the sandbox was still there
            raise HttpError(404, f"{UNREGISTERED} {sandbox.key} on this node") from None
        return cgroup

    def _wait_in_pool(self, sandbox: Sandbox, slot: PooledCgroup) -> bool:
        """Put a cgroup in its sandbox's pool, unless the sandbox is being unregistered (which takes the pool
        in the same locked step that marks it closing, so a slot added later would outlive it)."""
        with self._lock:
            if sandbox.closing or self.sandboxes.get(sandbox.key) is not sandbox:
                return False
            self.pools.setdefault(sandbox.key, {})[slot.call_id] = slot
            return True

    def _discard(self, slot: PooledCgroup) -> None:
        """A waiting cgroup that will serve no call: its process killed, its entries, directories and empty
        record removed, its release pipe closed."""
        if slot.release >= 0:
            os.close(slot.release)
            slot.release = -1
        slot.cgroup.kill()
        self.programs.untrack(slot.cgroup_id)
        self._removals.put(slot.cgroup)
        if slot.record_fd >= 0:
            os.close(slot.record_fd)
            slot.record_fd = -1
            self._record_path(slot.call_id).unlink(missing_ok=True)
        if slot.counters:
            slot.counters.close()
            slot.counters = None

    def _write_record(self, slot: PooledCgroup, data: bytes) -> None:
        """A pooled call's write-ahead record, into the file its fill opened: one write(2) at offset 0 (a
        record under a page is written whole or not at all should the agent die meanwhile; a longer one cut
        short does not parse, and reads as a call that never started, which is what it is: not answered,
        its process never released)."""
        fd, slot.record_fd = slot.record_fd, -1
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise OSError(f"short write of the record of call {slot.call_id}")

    def finish_call(self, peer: Peer, call_id: str, finish: CallFinish, memo: dict | None = None) -> CallRecord:
        record, rest = self.finish_call_answer_first(peer, call_id, finish, memo)
        rest()
        return record

    def finish_call_answer_first(self, peer: Peer, call_id: str, finish: CallFinish,
                                 memo: dict | None = None) -> tuple[CallRecord, Callable[[], None]]:
        """Finish a call up to what its answer needs; the second value does the rest, once it is answered."""
        record = self.running.get(call_id) or self.finished.get(call_id)
        if record is None:
            raise HttpError(404, f"no call {call_id}")
        self.runtime_sandbox(peer, {} if memo is None else memo, SandboxRef(name=record.sandbox, namespace=record.namespace))
        return self._finalize(call_id, finish)

    def call(self, peer: Peer, call_id: str) -> CallRecord:
        """A call's record, for root outside every sandbox or a process of the call's own sandbox."""
        record = self.running.get(call_id) or self.finished.get(call_id)
        if record is None:
            raise HttpError(404, f"no call {call_id}")
        sandbox = self.sandboxes.get(f"{record.namespace}/{record.sandbox}")
        if sandbox:
            self.require_runtime_or_admin(peer, sandbox)
        else:
            self.require_admin(peer)
        return record

    def finalize(self, call_id: str, finish: CallFinish) -> CallRecord:
        """End a call: kill what is left of it, read its counters, record it, remove its cgroup."""
        record, rest = self._finalize(call_id, finish)
        rest()
        return record

    def _finalize(self, call_id: str, finish: CallFinish) -> tuple[CallRecord, Callable[[], None]]:
        """A call's end up to its audit record (what its finish answers with), and the rest: map entries,
        the record on disk, history, metrics, the cgroup's removal. The rest may wait until the runtime has
        its answer: should the agent die before it is done, nothing is lost — a restarted agent finds the
        call's record on disk and finalizes it again (an audit line marked `recovered` beside the first; the
        cgroup is empty or gone, the exit code and counters are in the first line), and its sweep removes
        map entries and cgroups no running call accounts for."""
        with self._lock:
            record = self.running.pop(call_id, None)
            if record is None:
                if call_id in self.finished:
                    return self.finished[call_id], _nothing  # a retried finish
                raise HttpError(404, f"no call {call_id}")
        self.deadlines.cancel(call_id)
        cgroup = Cgroup(self.layout, record.cgroup_paths)
        with self._lock:
            files = self._counters.pop(call_id, None)
        counters, left = None, None
        if cgroup.exists():
            # Leftovers, daemonized grandchildren included: the call is over. Mostly there are none (the first
            # process was reaped before the runtime reported), and cgroup.kill takes the kernel's cgroup lock,
            # which a cgroup being made or removed elsewhere can hold for milliseconds: kill only what is there.
            # Nothing can join an empty call cgroup (only a member's fork, or root, puts a process in one).
            try:
                left = files.members() if files else cgroup.live_pids()
            except OSError:  # the cgroup went meanwhile (its files read ENODEV): as without them
                left = cgroup.live_pids()
            if left:
                cgroup.kill()
                cgroup.wait_empty()
            try:
                counters = files.counters() if files else cgroup.counters()
            except OSError:
                counters = cgroup.counters()
        # What the call executed: its events are in the ring buffer by now (a process's exit event is
        # written before its parent can reap it, and the runtime reports only then), read here.
        self.programs.consume_events()
        stats = self.programs.stats(record.cgroup_id)
        high_events = self.pressure.unwatch(call_id)
        now = time.time()
        record.finished_at = now
        record.usage = Usage(
            duration_seconds=round(now - record.started_at, 6),
            exit_code=finish.exit_code, signal=finish.signal, timed_out=record.timed_out,
            peak_memory_bytes=counters.peak_memory_bytes if counters else 0,
            cpu_seconds=round(counters.cpu_seconds, 6) if counters else 0.0,
            throttled_seconds=round(counters.throttled_seconds, 6) if counters else 0.0,
            oom_kills=max(counters.oom_kills if counters else 0, stats.ooms),
            processes_spawned=stats.forks + 1,  # the first process was forked before it joined the call
            connections_blocked=stats.blocked_connections,
            dns_refused=stats.dns_refused,  # egress: lookups refused (kernel-dropped and answered REFUSED)
            memory_high_events=high_events_seen(high_events, counters.memory_high_events if counters else 0,
                                                counters.peak_memory_bytes if counters else 0, record.limits.memory_high),
            pids_limit_hits=counters.pids_limit_hits if counters else 0,
        )
        with self._lock:
            self._by_cgroup.pop(record.cgroup_id, None)
            record.executed = self.executed.pop(call_id, [])
            self.finished[call_id] = record
            while len(self.finished) > FINISHED_KEPT:
                self.finished.popitem(last=False)
            self._append_audit(record)

        # Taken again by a later fill only if the call emptied it by itself and left little charged to it.
        spare = None
        if files and files.restartable and counters is not None and left is not None and not left \
                and not record.timed_out and counters.memory_bytes <= SPARE_CHARGE_BYTES:
            spare = SpareCgroup(cgroup, record.cgroup_id, record.limits, files)

        def rest() -> None:
            self.programs.untrack(record.cgroup_id)  # before a fill can take it as a spare: it tracks it afresh
            if not (spare and self._keep_spare(record, spare)):
                if files:
                    files.close()
                # Removing a v1 memory cgroup can wait on the kernel for milliseconds: the remover thread does it.
                self._removals.put(cgroup)
            self._record_path(call_id).unlink(missing_ok=True)
            with self._lock:
                key = f"{record.namespace}/{record.sandbox}\t{record.signature}"
                if record.usage and record.usage.peak_memory_bytes:
                    self.history.setdefault(key, deque(maxlen=HISTORY_WINDOW)).append(record.usage.peak_memory_bytes)
                self._save_history(force=False)
            sandbox = self.sandboxes.get(f"{record.namespace}/{record.sandbox}")
            if sandbox:
                sandbox.last_activity = now
                sandbox.totals.update(call_totals(record))
            self.metrics.finished(record)

        return record, rest

    def _keep_spare(self, record: CallRecord, spare: SpareCgroup) -> bool:
        with self._lock:
            sandbox = self.sandboxes.get(f"{record.namespace}/{record.sandbox}")
            if sandbox is None or sandbox.closing or len(sandbox.spares) >= POOL_SLOTS_PER_SANDBOX:
                return False
            sandbox.spares.append(spare)
            return True

    def _call_network(self, cgroup_id: int):
        """egress: the network and sandbox namespace of the running call with this cgroup id (for DNS)."""
        with self._lock:
            record = self.running.get(self._by_cgroup.get(cgroup_id, ""))
            return (record.limits.network, record.namespace) if record else None

    def _remove_cgroups(self) -> None:
        while (cgroup := self._removals.get()) is not None:
            try:
                cgroup.remove()
            except CgroupError as error:  # left for the sweep at the next start
                print(f"node agent: {error}", flush=True)

    def _forget(self, record: CallRecord) -> None:
        with self._lock:
            self.running.pop(record.call_id, None)
            self._by_cgroup.pop(record.cgroup_id, None)
            files = self._counters.pop(record.call_id, None)
        if files:
            files.close()
        self.programs.untrack(record.cgroup_id)
        self.pressure.unwatch(record.call_id)
        self._record_path(record.call_id).unlink(missing_ok=True)

    def _arm(self, record: CallRecord) -> None:
        self.deadlines.schedule(record.call_id, record.deadline, lambda: self._deadline_reached(record.call_id))

    def _deadline_reached(self, call_id: str) -> None:
        with self._lock:
            record = self.running.get(call_id)
            if record is None:
                return
            if not record.timed_out:
                record.timed_out = True
                self._save_call(record)
                Cgroup(self.layout, record.cgroup_paths).kill()
            # The runtime normally reports the killed process at once; if it is gone, close the call anyway.
            self.deadlines.schedule(call_id, time.time() + FINISH_GRACE_SECONDS, lambda: self._close_orphan(call_id))

    def _close_orphan(self, call_id: str) -> None:
        if call_id in self.running:
            self.finalize(call_id, CallFinish())

    def _record_path(self, call_id: str) -> Path:
        return self.state_dir / "calls" / f"{call_id}.json"

    def _save_call(self, record: CallRecord) -> None:
        _atomic_write(self._record_path(record.call_id), record.model_dump_json())

    def _append_audit(self, record: CallRecord) -> None:
        # One write(2) per record on a descriptor kept open with O_APPEND (an open per call, or Python's text
        # layers, cost more than the write itself).
        if self._audit is None:
            self._audit = os.open(self.audit_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        line = memoryview(record.model_dump_json().encode() + b"\n")
        while line:
            line = line[os.write(self._audit, line):]

    def _save_history(self, force: bool = True) -> None:
        # History only guides limits, so a crash may lose its last second; saved at most once a second.
        now = time.monotonic()
        if not force and now - self._history_saved < HISTORY_SAVE_INTERVAL:
            self._history_dirty = True
            return
        self._history_saved, self._history_dirty = now, False
        _atomic_write(self.state_dir / "history.json", json.dumps({k: list(v) for k, v in self.history.items()}))

    # --- events -----------------------------------------------------------------------------------------
    def _on_event(self, event: CallEvent) -> None:
        call_id = self._by_cgroup.get(event.cgroup_id)
        if call_id is None:
            return
        if event.kind == "exec":
            executed = self.executed.setdefault(call_id, [])
            if len(executed) < EXECUTED_KEPT:
                executed.append(event.comm)

    def _on_memory_high(self, call_id: str, seen: float, count: int) -> None:
        with self._lock:
            record = self.running.get(call_id)
            if record is not None and record.memory_high_first_seen is None:
                record.memory_high_first_seen = time.time() - (time.monotonic() - seen)

    # --- restart ------------------------------------------------------------------------------------------
    def _recover(self) -> None:
        for path in sorted((self.state_dir / "sandboxes").glob("*.json")):
            data = json.loads(path.read_text())
            spec = SandboxCreate.model_validate(data["spec"])
            cgroup = Cgroup(self.layout, data["paths"])
            if not cgroup.exists():
                path.unlink()
                continue
            sandbox = Sandbox(spec, cgroup, cgroup.child(MAIN_LEAF))
            self.sandboxes[spec.key] = sandbox
            self.programs.attach_egress(cgroup.unified_dir, sandbox.cgroup_id, sandbox.main.id)  # replaces the previous process's copy
        history = self.state_dir / "history.json"
        if history.exists():
            self.history = {k: deque(v, maxlen=HISTORY_WINDOW) for k, v in json.loads(history.read_text()).items()}
        tracked = self.programs.tracked()
        for path in sorted((self.state_dir / "calls").glob("*.json")):
            try:
                record = CallRecord.model_validate_json(path.read_text())
            except ValueError:  # empty or cut short: a pooled call never started (_write_record); swept below
                path.unlink()
                continue
            record.recovered = True
            cgroup = Cgroup(self.layout, record.cgroup_paths)
            if f"{record.namespace}/{record.sandbox}" not in self.sandboxes or not cgroup.exists():
                self.running[record.call_id] = record
                self.finalize(record.call_id, CallFinish())
                continue
            self.running[record.call_id] = record
            self._by_cgroup[record.cgroup_id] = record.call_id
            if record.cgroup_id not in tracked:
                self.programs.track(record.cgroup_id, record.limits.network)
            self.pressure.watch(record.call_id, cgroup, record.limits.memory_high)
            self.metrics.started(record.sandbox, record.namespace, record.started_at)
            if record.timed_out:
                self._deadline_reached(record.call_id)
            else:
                self._arm(record)
        self._sweep()

    def _sweep(self) -> None:
        """Remove call cgroups and map entries that no running call accounts for (a crash between
        creating a call's cgroup and recording it, or a record lost with its state directory)."""
        known_paths = {r.cgroup_paths[UNIFIED] for r in self.running.values()}
        for sandbox in self.sandboxes.values():
            for child in sandbox.cgroup.unified_dir.iterdir():
                if child.is_dir() and child.name.startswith(CALL_PREFIX):
                    leftover = sandbox.cgroup.child(child.name)
                    if leftover.unified_path not in known_paths:
                        leftover.remove()
        known_ids = {r.cgroup_id for r in self.running.values()}
        for cgroup_id in self.programs.tracked() | self.programs.policy_entries():
            if cgroup_id not in known_ids:
                self.programs.untrack(cgroup_id)
        attached = {sandbox.cgroup_id for sandbox in self.sandboxes.values()}
        self.programs.forget_sandbox_cgroups(lambda sandbox_id: sandbox_id not in attached)

    # --- lifecycle ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop this process's threads; running calls, cgroups, maps and attachments stay for the next."""
        if self._stopped:
            return
        self._stopped = True
        with self._lock:
            if self._history_dirty:
                self._save_history()
        self.deadlines.close()
        self._removals.put(None)
        self._remover.join(timeout=30)
        self.pressure.close()
        self.egress.close()
        self.programs.close()
        if self._audit is not None:
            os.close(self._audit)

    def teardown(self) -> None:
        """Remove everything this agent made: calls, sandboxes, cgroups, attachments, pins, state."""
        for call_id in list(self.running):
            self.finalize(call_id, CallFinish())
        root = Peer(os.getpid(), 0, 0)
        for sandbox in list(self.sandboxes.values()):
            self.delete_sandbox(root, SandboxRef(name=sandbox.spec.name, namespace=sandbox.spec.namespace))
        self.root.remove()
        self.stop()
        self.programs.remove_pins()


def _nothing() -> None:
    pass


def _atomic_write(path: Path, text: str) -> None:
    # Atomic against the agent dying mid-write. No fsync: state only has to outlive the agent process;
    # if the machine goes down, the cgroups and processes it describes are gone too.
    temporary = path.with_suffix(".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    os.replace(temporary, path)
