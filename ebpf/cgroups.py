"""Cgroups for sandboxes and tool calls, on pure cgroup v2 and on v1+v2 hybrid hosts, behind one interface.

A "cgroup" here is one logical group that exists once per hierarchy the agent uses: on pure v2 that is
the unified hierarchy alone; on a hybrid host the v1 hierarchies that carry memory/cpu/cpuacct/pids plus
the v2 `unified` hierarchy, which BPF programs attach to and which identifies a process's cgroup for BPF
(`bpf_get_current_cgroup_id`, `bpf_skb_cgroup_id`) and offers `cgroup.kill`.

What to write and how to read counters are pure functions (`limit_settings`, `parse_*`); the `Cgroup`
class does the file I/O.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agentkube.contract import CPU_PERIOD_US, Envelope, Limits, memory_high_for
from agentkube.ebpf.kernelfiles import pread_text, read_text, write_text

UNIFIED = "unified"
# v1 controllers the agent drives on a hybrid host (cpuacct for CPU time; cpu for quota and throttling).
V1_CONTROLLERS = frozenset({"memory", "cpu", "cpuacct", "pids"})
V2_CONTROLLERS = ("memory", "cpu", "pids")  # enabled in subtree_control on pure v2
MAIN_LEAF = "agent"  # the leaf a sandbox's own processes live in, so none sits in a cgroup with children
REMOVE_WAIT_SECONDS = 10.0  # bound on waiting for killed processes to leave a cgroup

LayoutKind = Literal["v2", "hybrid"]


class CgroupError(RuntimeError):
    pass


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: the unified (v2) one, or a v1 one with its controllers."""

    name: str  # "unified" or the v1 controllers joined by "," (as /proc/<pid>/cgroup names them)
    mount: Path
    controllers: frozenset[str]
    version: int


@dataclass(frozen=True)
class CgroupLayout:
    kind: LayoutKind
    hierarchies: tuple[Hierarchy, ...]

    @property
    def unified(self) -> Hierarchy:
        return next(h for h in self.hierarchies if h.version == 2)

    def hierarchy_for(self, controller: str) -> Hierarchy:
        """The hierarchy a controller's files live in."""
        for hierarchy in self.hierarchies:
            if controller in hierarchy.controllers:
                return hierarchy
        raise CgroupError(f"controller {controller} is not available on this host ({self.kind})")


def parse_mounts(mounts: str, unified_controllers: Iterable[str] | None = None) -> CgroupLayout:
    """The layout from /proc/self/mounts text. `unified_controllers` is the content of the v2 root's
    cgroup.controllers (what v2 can enforce); a hybrid host is one whose memory controller is on v1."""
    unified: Path | None = None
    v1: list[Hierarchy] = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = Path(fields[1]), fields[2], fields[3].split(",")
        if fstype == "cgroup2":
            unified = unified or mountpoint
        elif fstype == "cgroup":
            controllers = frozenset(options) & V1_CONTROLLERS
            if controllers:
                v1.append(Hierarchy(",".join(sorted(controllers)), mountpoint, controllers, 1))
    if unified is None:
        raise CgroupError("no cgroup2 (unified) hierarchy is mounted: cgroup BPF programs need one")
    if any("memory" in h.controllers for h in v1):
        return CgroupLayout("hybrid", (Hierarchy(UNIFIED, unified, frozenset(), 2), *v1))
    controllers = frozenset(unified_controllers or ()) & frozenset(V2_CONTROLLERS)
    missing = set(V2_CONTROLLERS) - controllers
    if missing:
        raise CgroupError(f"cgroup v2 lacks controllers {sorted(missing)} and they are not on v1 either")
    return CgroupLayout("v2", (Hierarchy(UNIFIED, unified, controllers, 2),))


def detect_layout() -> CgroupLayout:
    """This host's layout."""
    mounts = Path("/proc/self/mounts").read_text()
    unified = next((Path(f.split()[1]) for f in mounts.splitlines() if len(f.split()) > 2 and f.split()[2] == "cgroup2"), None)
    controllers = (unified / "cgroup.controllers").read_text().split() if unified else []
    return parse_mounts(mounts, controllers)


def mount_options(mounts: str, mountpoint: Path) -> list[str]:
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 3 and Path(fields[1]) == mountpoint:
            return fields[3].split(",")
    raise CgroupError(f"{mountpoint} is not mounted")


def favors_dynmods(layout: CgroupLayout) -> bool:
    return "favordynmods" in mount_options(Path("/proc/self/mounts").read_text(), layout.unified.mount)


def set_favor_dynmods(layout: CgroupLayout, enabled: bool) -> None:
    """Moving a process between cgroups takes a global lock whose first writer after a quiet spell waits
    for an RCU grace period (~10 ms here), once per tool call. `favordynmods` keeps that lock in the mode
    where writers do not wait, at a small cost to every fork and exit on the host: the trade a node that
    moves a process per tool call wants. Host-wide, and left as set when the agent stops: the CLI asks for it
    (`--favor-dynmods`), the chart's node agent turns it on by default (`nodeAgent.favorDynmods`)."""
    options = [o for o in mount_options(Path("/proc/self/mounts").read_text(), layout.unified.mount)
               if o != "favordynmods"] + (["favordynmods"] if enabled else [])
    # Only the options given here: util-linux would otherwise merge back the current ones.
    subprocess.run(["mount", "--options-source", "disable", "-o", "remount," + ",".join(options),
                    str(layout.unified.mount)], check=True, capture_output=True, text=True)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup → {hierarchy name: path}; the v2 line ("0::/x") is keyed "unified", v1 lines by
    their controllers sorted and joined (as Hierarchy.name), named hierarchies ("name=systemd") skipped."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not number:
            continue
        if number == "0" and controllers == "":
            paths[UNIFIED] = path
            continue
        wanted = frozenset(controllers.split(",")) & V1_CONTROLLERS
        if wanted:
            paths[",".join(sorted(wanted))] = path
    return paths


def is_within(path: str, ancestor: str) -> bool:
    """Whether cgroup `path` is `ancestor` or below it (by path components, not string prefix)."""
    path, ancestor = path.rstrip("/") or "/", ancestor.rstrip("/") or "/"
    return ancestor == "/" or path == ancestor or path.startswith(ancestor + "/")


def local_root_paths(layout: CgroupLayout, own: Mapping[str, str], name: str) -> dict[str, str]:
    """Where `--local` sandboxes live in each hierarchy. v1 hierarchies allow processes beside child
    cgroups, so sandboxes nest under the agent's own cgroup there (they stay inside whatever accounts
    for the agent). On v2 a cgroup that delegates controllers may hold no processes, so the root is a
    top-level cgroup beside the agent's rather than under it."""
    roots = {}
    for hierarchy in layout.hierarchies:
        if hierarchy.version == 2:
            roots[hierarchy.name] = "/" + name
        else:
            roots[hierarchy.name] = (own.get(hierarchy.name, "/").rstrip("/") + "/" + name)
    return roots


def kubernetes_container_paths(pod_uid: str, container_id: str, qos: str) -> list[str]:
    """Candidate cgroup paths (relative to a hierarchy's mount) of a container, for kubelet's cgroupfs
    and systemd drivers and the common runtimes' scope prefixes. `qos` is guaranteed|burstable|besteffort."""
    container_id = container_id.split("://", 1)[-1]
    qos = qos.lower()
    cgroupfs_parent = "/kubepods" if qos == "guaranteed" else f"/kubepods/{qos}"
    slice_uid = pod_uid.replace("-", "_")
    if qos == "guaranteed":
        systemd_parent = f"/kubepods.slice/kubepods-pod{slice_uid}.slice"
    else:
        systemd_parent = f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{slice_uid}.slice"
    paths = [f"{cgroupfs_parent}/pod{pod_uid}/{container_id}"]
    paths += [f"{systemd_parent}/{prefix}-{container_id}.scope" for prefix in ("cri-containerd", "crio", "docker")]
    return paths


def limit_settings(kind: LayoutKind, memory: int, cpu: float, pids: int) -> list[tuple[str, str, str, bool]]:
    """(controller, file, value, required) to write, in order, for the given limits.

    On v1 there is no memory.high: the soft limit (reclaimed first under pressure) stands in for it and
    the agent watches the high threshold itself with a usage eventfd; memsw (swap accounting) is set
    only where the kernel has it."""
    high = memory_high_for(memory)
    quota = max(1000, round(cpu * CPU_PERIOD_US))
    if kind == "v2":
        return [
            ("memory", "memory.max", str(memory), True),
            ("memory", "memory.high", str(high), True),
            ("memory", "memory.swap.max", "0", False),
            ("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}", True),
            ("pids", "pids.max", str(pids), True),
        ]
    return [
        ("memory", "memory.limit_in_bytes", str(memory), True),
        ("memory", "memory.memsw.limit_in_bytes", str(memory), False),
        ("memory", "memory.soft_limit_in_bytes", str(high), True),
        ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US), True),
        ("cpu", "cpu.cfs_quota_us", str(quota), True),
        ("pids", "pids.max", str(pids), True),
    ]


def limit_writes(kind: LayoutKind, new: Limits, old: Limits | None = None) -> list[tuple[str, str, str, bool]]:
    """What to write, in order, to change a cgroup's limits from `old` (what its files hold; None: a new
    cgroup) to `new`: only the files whose value changes (a pooled call cgroup already holds the sandbox's
    defaults, and most calls ask for those). On v1 the memory+swap limit may never be below the memory
    limit, so when memory rises it is written first."""
    wanted = limit_settings(kind, new.memory, new.cpu, new.pids)
    if old is not None:
        held = set(limit_settings(kind, old.memory, old.cpu, old.pids))
        wanted = [setting for setting in wanted if setting not in held]
        if kind == "hybrid" and new.memory > old.memory:
            wanted.sort(key=lambda setting: setting[1] != "memory.memsw.limit_in_bytes")
    return wanted


def delegation_chain(mount: Path, directory: Path) -> list[Path]:
    """The cgroups whose subtree_control must enable a controller for `directory`'s children to use it,
    from the hierarchy's root down to `directory` itself."""
    relative = directory.relative_to(mount)
    return [mount] + [mount.joinpath(*relative.parts[:i]) for i in range(1, len(relative.parts) + 1)]


def parse_flat_keyed(text: str) -> dict[str, int]:
    """"key value" lines (memory.events, cpu.stat, memory.oom_control) → {key: int}."""
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            values[key] = int(value)
    return values


@dataclass(frozen=True)
class Counters:
    """A cgroup's own counters at one moment: cumulative since its creation, or since `since`'s baseline."""

    peak_memory_bytes: int = 0  # since its creation, or since the peak was last reset
    cpu_seconds: float = 0.0
    throttled_seconds: float = 0.0
    oom_kills: int = 0
    memory_high_events: int = 0  # v2 only (memory.events "high"); v1 counts via eventfd
    pids_limit_hits: int = 0  # forks refused by pids.max
    memory_bytes: int = 0  # charged to it now (not cumulative): what a call left behind, page cache mostly

    def since(self, baseline: Counters) -> Counters:
        """The counters accrued after `baseline` (read from the same cgroup earlier); the peak and the charge
        are what they are now (a reused cgroup's peak is reset, not subtracted)."""
        return Counters(
            peak_memory_bytes=self.peak_memory_bytes,
            cpu_seconds=max(0.0, self.cpu_seconds - baseline.cpu_seconds),
            throttled_seconds=max(0.0, self.throttled_seconds - baseline.throttled_seconds),
            oom_kills=max(0, self.oom_kills - baseline.oom_kills),
            memory_high_events=max(0, self.memory_high_events - baseline.memory_high_events),
            pids_limit_hits=max(0, self.pids_limit_hits - baseline.pids_limit_hits),
            memory_bytes=self.memory_bytes,
        )


def counters_from_files(kind: LayoutKind, files: Mapping[str, str]) -> Counters:
    """Counters from the text of a cgroup's files (keyed by file name)."""
    if kind == "v2":
        events = parse_flat_keyed(files.get("memory.events", ""))
        cpu = parse_flat_keyed(files.get("cpu.stat", ""))
        return Counters(
            peak_memory_bytes=int(files.get("memory.peak", "0").strip() or 0),
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
            throttled_seconds=cpu.get("throttled_usec", 0) / 1e6,
            oom_kills=events.get("oom_kill", 0),
            memory_high_events=events.get("high", 0),
            pids_limit_hits=parse_flat_keyed(files.get("pids.events", "")).get("max", 0),
            memory_bytes=int(files.get("memory.current", "0").strip() or 0),
        )
    oom = parse_flat_keyed(files.get("memory.oom_control", ""))
    cpu = parse_flat_keyed(files.get("cpu.stat", ""))
    return Counters(
        peak_memory_bytes=int(files.get("memory.max_usage_in_bytes", "0").strip() or 0),
        cpu_seconds=int(files.get("cpuacct.usage", "0").strip() or 0) / 1e9,
        throttled_seconds=cpu.get("throttled_time", 0) / 1e9,
        oom_kills=oom.get("oom_kill", 0),
        pids_limit_hits=parse_flat_keyed(files.get("pids.events", "")).get("max", 0),
        memory_bytes=int(files.get("memory.usage_in_bytes", "0").strip() or 0),
    )


COUNTER_FILES: dict[LayoutKind, tuple[tuple[str, str], ...]] = {
    "v2": (("memory", "memory.peak"), ("memory", "memory.events"), ("cpu", "cpu.stat"), ("pids", "pids.events"),
           ("memory", "memory.current")),
    "hybrid": (("memory", "memory.max_usage_in_bytes"), ("memory", "memory.oom_control"),
               ("cpuacct", "cpuacct.usage"), ("cpu", "cpu.stat"), ("pids", "pids.events"),
               ("memory", "memory.usage_in_bytes")),
}
# The peak's file, whose writing resets it: to the charge now (v1), or for reads through the same open file (v2,
# Linux 6.12 and later; before that memory.peak cannot be written, so a call cgroup is not reused).
PEAK_FILE: dict[LayoutKind, str] = {"v2": "memory.peak", "hybrid": "memory.max_usage_in_bytes"}


class Cgroup:
    """One logical cgroup: a directory in each hierarchy the layout uses."""

    def __init__(self, layout: CgroupLayout, paths: Mapping[str, str]):
        self.layout = layout
        self.paths = dict(paths)  # hierarchy name -> path relative to that hierarchy's mount
        # Built once: a call touches these directories dozens of times on its hot path.
        self._dirs = {h.name: h.mount / self.paths[h.name].lstrip("/") for h in layout.hierarchies}

    def dir(self, hierarchy: Hierarchy) -> Path:
        return self._dirs[hierarchy.name]

    def controller_dir(self, controller: str) -> Path:
        return self._dirs[self.layout.hierarchy_for(controller).name]

    @property
    def unified_dir(self) -> Path:
        return self.dir(self.layout.unified)

    @property
    def unified_path(self) -> str:
        return self.paths[UNIFIED]

    def child(self, name: str) -> Cgroup:
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(f"bad cgroup name {name!r}")
        return Cgroup(self.layout, {h: p.rstrip("/") + "/" + name for h, p in self.paths.items()})

    def exists(self) -> bool:
        return self.unified_dir.is_dir()

    @property
    def id(self) -> int:
        """The v2 cgroup id BPF sees (the inode of the unified directory)."""
        return os.stat(self.unified_dir).st_ino

    def create(self, delegate: bool = False, parents: bool = True) -> None:
        """Make the directories (parents too, unless `parents` is false: then a missing parent raises
        FileNotFoundError instead of being made again without its limits). With `delegate` on v2, enable the controllers for this
        cgroup's children, and in every ancestor, since a child can only use what each ancestor delegates.
        A cgroup that delegates may hold no process (v2), so delegate only once its processes have moved
        to a leaf."""
        for hierarchy in self.layout.hierarchies:
            directory = self.dir(hierarchy)
            directory.mkdir(parents=parents, exist_ok=True)
            if delegate and hierarchy.version == 2 and self.layout.kind == "v2":
                enable = " ".join(f"+{c}" for c in V2_CONTROLLERS)
                for ancestor in delegation_chain(hierarchy.mount, directory):
                    _write(ancestor / "cgroup.subtree_control", enable)

    def set_limits(self, memory: int, cpu: float, pids: int) -> None:
        self._write_settings(limit_settings(self.layout.kind, memory, cpu, pids))

    def _write_settings(self, settings: list[tuple[str, str, str, bool]]) -> None:
        for controller, name, value, required in settings:
            try:
                _write(self.controller_dir(controller) / name, value)
            except FileNotFoundError:
                if required:  # an optional file this kernel lacks (memsw without swap accounting) is skipped
                    raise

    def set_envelope(self, envelope: Envelope) -> None:
        self.set_limits(envelope.memory, envelope.cpu, envelope.pids)

    def apply(self, limits: Limits, previous: Limits | None = None) -> None:
        """Write `limits`; with `previous` (what the files hold now), only what changes."""
        self._write_settings(limit_writes(self.layout.kind, limits, previous))

    def add_process(self, pid: int) -> None:
        """Move a process into this cgroup in every hierarchy; the unified one last, so that BPF (which
        keys on the v2 cgroup) sees the process as the call's only once its limits apply."""
        for hierarchy in sorted(self.layout.hierarchies, key=lambda h: h.version == 2):
            _write(self.dir(hierarchy) / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for hierarchy in self.layout.hierarchies:
            try:
                text = (self.dir(hierarchy) / "cgroup.procs").read_text()
            except FileNotFoundError:
                continue
            found.update(int(p) for p in text.split())
        return found

    def live_pids(self) -> set[int]:
        """The processes alive in it: its unified membership (an exiting process leaves every hierarchy at once,
        but one that has exited can linger in a v1 cgroup.procs until reaped)."""
        try:
            return {int(p) for p in read_text(self.unified_dir / "cgroup.procs").split()}
        except FileNotFoundError:
            return set()

    def kill(self) -> None:
        """Kill every process in the cgroup, daemonized descendants included. cgroup.kill (v2, also in the
        unified hierarchy of a hybrid host) kills atomically, so nothing can fork its way out; without it,
        SIGKILL each member until none is left (bounded; pids.max bounds the forks meanwhile)."""
        kill_file = self.unified_dir / "cgroup.kill"
        if kill_file.exists():
            try:
                _write(kill_file, "1")
            except FileNotFoundError:
                pass
            return
        for _ in range(1000):
            members = self.pids()
            if not members:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def counters(self) -> Counters:
        files = {}
        for controller, name in COUNTER_FILES[self.layout.kind]:
            try:
                files[name] = read_text(self.controller_dir(controller) / name)
            except (FileNotFoundError, CgroupError):
                continue
        return counters_from_files(self.layout.kind, files)

    def open_counters(self) -> OpenCounters:
        """Its counter files and unified membership, opened now to be read later without an open each."""
        return OpenCounters(self)

    def wait_empty(self, timeout: float = REMOVE_WAIT_SECONDS) -> bool:
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def children(self) -> set[str]:
        names: set[str] = set()
        for hierarchy in self.layout.hierarchies:
            try:
                with os.scandir(self.dir(hierarchy)) as entries:  # d_type: no stat per control file
                    names.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
        return names

    def remove(self) -> None:
        """Kill what is left and remove the directories (children first). Idempotent."""
        try:  # the common case, an empty leaf, costs one rmdir per hierarchy
            for hierarchy in self.layout.hierarchies:
                try:
                    os.rmdir(self.dir(hierarchy))
                except FileNotFoundError:
                    pass
            return
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove {self.unified_path}: {error.strerror}") from None
        for name in sorted(self.children()):
            self.child(name).remove()
        if self.pids():
            self.kill()
            if not self.wait_empty():
                raise CgroupError(f"processes {sorted(self.pids())} did not leave {self.unified_path}")
        for hierarchy in self.layout.hierarchies:
            _rmdir(self.dir(hierarchy))


class OpenCounters:
    """A call cgroup's counter files and its unified `cgroup.procs`, kept open from its fill to its end (and on,
    should the cgroup serve another call) and read with pread(2) at offset 0 (a cgroup file is generated afresh
    for a read from its start), so that a call's start and finish pay one system call per file instead of three.
    Its counters are those of the current call: accrued since `restart`, the peak reset there."""

    def __init__(self, cgroup: Cgroup):
        self.kind = cgroup.layout.kind
        self.procs, self._fds = -1, {}
        self._baseline = Counters()
        self.restartable = False  # whether its peak can be reset, so that the cgroup can serve another call
        try:
            self.procs = os.open(cgroup.unified_dir / "cgroup.procs", os.O_RDONLY | os.O_CLOEXEC)
            for controller, name in COUNTER_FILES[self.kind]:
                path = cgroup.controller_dir(controller) / name
                try:
                    if name == PEAK_FILE[self.kind]:
                        try:
                            self._fds[name], self.restartable = os.open(path, os.O_RDWR | os.O_CLOEXEC), True
                            continue
                        except PermissionError:  # a kernel whose peak cannot be reset: read it only
                            pass
                    self._fds[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:  # a file this kernel lacks: counted as zero, as Cgroup.counters does
                    continue
        except BaseException:
            self.close()
            raise

    def members(self) -> list[str]:
        """The PIDs in its unified cgroup.procs (an exited process leaves it at once)."""
        return pread_text(self.procs).split()

    def _cumulative(self) -> Counters:
        return counters_from_files(self.kind, {name: pread_text(fd) for name, fd in self._fds.items()})

    def counters(self) -> Counters:
        return self._cumulative().since(self._baseline)

    def restart(self) -> None:
        """Count from now on for the cgroup's next call (it holds no process): the peak reset to the charge
        now, the cumulative counters read as the baseline the next call's are taken from."""
        os.write(self._fds[PEAK_FILE[self.kind]], b"0")
        self._baseline = self._cumulative()

    def close(self) -> None:
        for fd in [self.procs, *self._fds.values()]:
            if fd >= 0:
                os.close(fd)
        self.procs, self._fds = -1, {}


def _write(path: Path, value: str) -> None:
    try:
        write_text(path, value)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise
        raise CgroupError(f"cannot write {value!r} to {path}: {error.strerror}") from None


def _rmdir(directory: Path) -> None:
    # A process that has exited can linger in a v1 cgroup for a moment until its parent reaps it.
    deadline = time.monotonic() + REMOVE_WAIT_SECONDS
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != errno.EBUSY or time.monotonic() > deadline:
                raise CgroupError(f"cannot remove {directory}: {error.strerror}") from None
            time.sleep(0.005)


def own_cgroups(pid: int | str = "self") -> dict[str, str]:
    return parse_proc_cgroup(read_text(f"/proc/{pid}/cgroup"))
