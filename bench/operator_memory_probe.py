"""`agentkube ...` with a probe thread that records what the process holds at each new peak of its resident memory.

Run the operator under it as an extra scenario of bench/sandbox_scale.py:

    OPERATOR_MEMORY_PROBE=/tmp/probe.json .venv/bin/python bench/sandbox_scale.py --count 1000 --only probe \\
        --output probe --scenario "probe=bench/manifests/agentkube=.venv/bin/python bench/operator_memory_probe.py \\
        operator run --metrics-port=0 --liveness-port=0 --peering="

At each new peak (checked every second, from 6 s after start: walking the objects while modules are still being
imported can catch a tuple half-built) it writes to OPERATOR_MEMORY_PROBE: VmRSS, RssAnon and RssFile (KiB); the
threads; the objects the garbage collector tracks, by type; Kopf's asyncio tasks, by coroutine; the TCP connections
by remote port; glibc's `malloc_info` (one <heap> per malloc arena) beside it as .mallinfo.xml, and CPython's
small-object allocator (`sys._debugmallocstats`) as .pymalloc.txt. The probe's own walk costs memory too (its
peaks read a few MiB above the bare operator's): compare probes with probes.
"""

import collections
import ctypes
import gc
import json
import os
import sys
import threading
import time

import psutil

OUT = os.environ.get("OPERATOR_MEMORY_PROBE", "/tmp/operator-memory-probe.json")
START_AFTER_SECONDS = 6


def _status() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "RssAnon", "RssFile")}


def _malloc_info(path: str) -> None:
    libc = ctypes.CDLL(None)
    libc.fopen.restype = ctypes.c_void_p
    stream = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))


def _pymalloc_stats(path: str) -> None:
    saved = os.dup(2)  # _debugmallocstats writes to the C stderr
    with open(path, "w") as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def probe() -> None:
    time.sleep(START_AFTER_SECONDS)
    peak = 0
    while True:
        time.sleep(1.0)
        status = _status()
        if status["VmRSS"] <= peak + 1024:
            continue
        peak = status["VmRSS"]
        objects = gc.get_objects()
        types = collections.Counter(type(o).__qualname__ for o in objects)
        tasks = collections.Counter(getattr(o.get_coro(), "__qualname__", "?") for o in objects if type(o).__name__ == "Task")
        del objects
        connections = collections.Counter(c.raddr.port for c in psutil.Process().net_connections("tcp")
                                          if c.status == "ESTABLISHED" and c.raddr)
        _malloc_info(OUT + ".mallinfo.xml")
        _pymalloc_stats(OUT + ".pymalloc.txt")
        record = {"time": time.time(), "kib": status, "threads": threading.active_count(), "gc_objects": sum(types.values()),
                  "types": types.most_common(60), "tasks": tasks.most_common(20), "tcp_by_port": connections,
                  "modules": len(sys.modules)}
        with open(OUT, "w") as out:
            json.dump(record, out, indent=1)


if __name__ == "__main__":
    threading.Thread(target=probe, daemon=True).start()
    from agentkube.cli import app

    app(sys.argv[1:], prog_name="agentkube")
