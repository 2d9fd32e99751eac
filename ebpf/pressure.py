"""Push notification when a call's memory crosses its memory.high, without polling.

On v2 the kernel counts `high` events in memory.events and signals a modification of that file
(inotify IN_MODIFY). On v1 there is no memory.high; the memory controller instead signals an eventfd
when usage crosses a registered threshold (cgroup.event_control), which the agent sets at the same
value memory.high would have. Both end up in one selector thread.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from agentkube.ebpf.cgroups import Cgroup, parse_flat_keyed

IN_MODIFY = 0x2
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# handler(key, monotonic time the agent saw it, number of new high events)
Handler = Callable[[str, float, int], None]
# A watch is armed only once its call has run this long. Most tool calls are shorter (`ls`, `cat`, `git
# status`): for them the peak check at the end (`high_events_seen`) says all there is to say, and a v1
# usage threshold never registered is one whose removal does not hold the kernel's cgroup lock for
# milliseconds, in the way of the next call cgroup's mkdir. A crossing in the first ARM_AFTER_SECONDS of a
# longer call is counted at its end, not pushed.
ARM_AFTER_SECONDS = 0.010


class PressureWatcher:
    def __init__(self, handler: Handler):
        self.handler = handler
        self.selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._inotify: int | None = None
        self._watches: dict[int, tuple[str, Path, int]] = {}  # inotify wd -> (key, memory.events, last high)
        self._eventfds: dict[str, tuple[int, int, int]] = {}  # key -> (eventfd, usage file fd, threshold)
        self._counts: dict[str, int] = {}
        self._pending: dict[str, tuple[str, Path, int, float]] = {}  # key -> (layout, memory dir, threshold, due)
        self._wake_at = 0.0  # when the watcher thread wakes up next at the latest (monotonic)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="memory-high", daemon=True)
        self._thread.start()

    def watch(self, key: str, cgroup: Cgroup, high_bytes: int, arm_after: float = ARM_AFTER_SECONDS) -> None:
        """Start watching once `arm_after` s have passed (unless unwatched before). Arming happens in the
        watcher thread, off the caller's path: registering a v1 threshold waits for an RCU grace period
        (milliseconds). A crossing before the watch is armed is caught by the peak check at the end of the
        call (`high_events_seen`)."""
        due = time.monotonic() + arm_after
        with self._lock:
            self._counts[key] = 0
            self._pending[key] = (cgroup.layout.kind, cgroup.controller_dir("memory"), high_bytes, due)
            wake = due < self._wake_at  # else the thread wakes in time anyway: no wake-up per call
        if wake:
            os.write(self._wake_w, b"w")

    def _arm_due(self) -> float:
        """Arm the watches that are due; returns how long until the next one is (at most 1 s)."""
        now = time.monotonic()
        with self._lock:
            due = {key: entry for key, entry in self._pending.items() if entry[3] <= now}
            for key in due:
                del self._pending[key]
            wait = min([1.0] + [entry[3] - now for entry in self._pending.values()])
            self._wake_at = now + wait
        for key, (kind, memory_dir, high_bytes, _) in due.items():
            try:
                if kind == "v2":
                    self._watch_v2(key, memory_dir)
                else:
                    self._watch_v1(key, memory_dir, high_bytes)
            except OSError:
                pass  # the call ended (its cgroup is gone) before the watch was armed
        return max(0.0, wait)

    def _watch_v2(self, key: str, memory_dir: Path) -> None:
        with self._lock:
            if key in self._counts:
                self._add_inotify_watch(key, memory_dir)

    def _add_inotify_watch(self, key: str, memory_dir: Path) -> None:
        if self._inotify is None:
            fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                raise OSError(ctypes.get_errno(), "inotify_init1")
            self._inotify = fd
            self.selector.register(fd, selectors.EVENT_READ, "inotify")
        events = memory_dir / "memory.events"
        wd = self._libc.inotify_add_watch(self._inotify, str(events).encode(), IN_MODIFY)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {events}")
        self._watches[wd] = (key, events, parse_flat_keyed(events.read_text()).get("high", 0))

    def _watch_v1(self, key: str, memory_dir: Path, high_bytes: int) -> None:
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        usage = os.open(memory_dir / "memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Outside the lock: registering a threshold waits for an RCU grace period.
            with open(memory_dir / "cgroup.event_control", "w") as control:
                control.write(f"{efd} {usage} {high_bytes}")
        except OSError:
            os.close(efd)
            os.close(usage)
            raise
        with self._lock:
            if key not in self._counts:  # unwatched meanwhile
                os.close(efd)
                os.close(usage)
                return
            self._eventfds[key] = (efd, usage, high_bytes)
            self.selector.register(efd, selectors.EVENT_READ, key)

    def count(self, key: str) -> int:
        return self._counts.get(key, 0)

    def unwatch(self, key: str) -> int:
        """Stop watching; returns the number of high events seen."""
        with self._lock:
            self._pending.pop(key, None)
            pair = self._eventfds.pop(key, None)
            if pair:
                self.selector.unregister(pair[0])
                os.close(pair[0])
                os.close(pair[1])
            for wd, (watched, _, _) in list(self._watches.items()):
                if watched == key:
                    self._libc.inotify_rm_watch(self._inotify, wd)
                    del self._watches[wd]
            return self._counts.pop(key, 0)

    def _run(self) -> None:
        while not self._stop:
            for selected, _ in self.selector.select(timeout=self._arm_due()):
                seen = time.monotonic()
                data = selected.data
                if data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif data == "inotify":
                    self._read_inotify(seen)
                else:
                    self._read_eventfd(data, selected.fd, seen)

    def _read_eventfd(self, key: str, fd: int, seen: float) -> None:
        try:
            os.eventfd_read(fd)
        except (BlockingIOError, OSError):
            return
        with self._lock:
            pair = self._eventfds.get(key)
            if pair is None:
                return
            # The threshold fires on each crossing, up and down; only an upward one is a high event.
            try:
                usage = int(os.pread(pair[1], 64, 0).strip() or 0)
            except OSError:
                return
            if usage < pair[2]:
                return
            self._counts[key] += 1
        self.handler(key, seen, 1)

    def _read_inotify(self, seen: float) -> None:
        if self._inotify is None:  # polled only once it exists
            return
        try:
            data = os.read(self._inotify, 64 * 1024)
        except BlockingIOError:
            return
        offset = 0
        while offset + 16 <= len(data):
            wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            offset += 16 + length
            with self._lock:
                entry = self._watches.get(wd)
                if not entry:
                    continue
                key, path, last = entry
                try:
                    high = parse_flat_keyed(path.read_text()).get("high", 0)
                except FileNotFoundError:
                    continue
                new = high - last
                if new <= 0:
                    continue
                self._watches[wd] = (key, path, high)
                self._counts[key] = self._counts.get(key, 0) + new
            self.handler(key, seen, new)

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"q")
        self._thread.join(timeout=3)
        for key in list(self._counts):
            self.unwatch(key)
        if self._inotify is not None:
            os.close(self._inotify)
        os.close(self._wake_r)
        os.close(self._wake_w)


def high_events_seen(watched: int, counted_by_kernel: int, peak_bytes: int, high_bytes: int) -> int:
    """High events for a finished call: what the watcher saw or the kernel counted (v2), and at least one
    if the call's peak reached memory.high (a crossing before the watch was armed)."""
    events = max(watched, counted_by_kernel)
    return events if events or peak_bytes < high_bytes else 1
