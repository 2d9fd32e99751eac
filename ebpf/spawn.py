"""Start a process with the C library's posix_spawn, the interpreter's lock released while it runs.

`os.posix_spawn` holds the GIL for the whole spawn: the vfork-style child borrows the parent's memory until
it has exec'd, so the calling thread waits 0.5–1.5 ms on this machine, and every other thread of the runtime
waits with it (measured: a spinning thread got 5–25× fewer iterations through an `os.posix_spawn` than
through this one). The runtime's pool refill spawns held processes beside the calls it serves, so each of its
spawns used to stall the answer of the call that had just ended. Through ctypes (which releases the GIL
around foreign calls) only the spawning thread waits.

The child's descriptors are set up as the caller lists them (`dup2s`: source → target, in order), after
each source is first copied above every target: a source numbered like an earlier target (descriptors come
and go in other threads, so a pipe made just before can be fd 3 or 4) would otherwise be overwritten by an
earlier dup2 before its own.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
from collections.abc import Mapping, Sequence

# glibc's flags (spawn.h): setsid() in the child (glibc ≥ 2.26; Python's os.POSIX_SPAWN_SETSID is not
# exported), and the signals of its set back to their default actions.
POSIX_SPAWN_SETSID = 0x80
POSIX_SPAWN_SETSIGDEF = 0x04
# Python ignores SIGPIPE and SIGXFSZ in itself, and an ignored signal stays ignored across exec: a tool call
# would start with them ignored, so `yes | head -1` ended in "Broken pipe" errors instead of `yes` dying
# quietly as in a shell. Commands get the default actions a shell gives them.
DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
# posix_spawn_file_actions_t and posix_spawnattr_t are opaque (80 and 336 bytes in glibc on x86-64 and
# arm64): room for either, initialised and destroyed by the library's own functions.
_OPAQUE_BYTES = 512

_libc = ctypes.CDLL(None, use_errno=True)
_libc.posix_spawn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_char_p)]
_libc.posix_spawn_file_actions_adddup2.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_libc.posix_spawnattr_setflags.argtypes = [ctypes.c_void_p, ctypes.c_short]
_libc.posix_spawnattr_setsigdefault.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
_libc.sigemptyset.argtypes = [ctypes.c_void_p]
_libc.sigaddset.argtypes = [ctypes.c_void_p, ctypes.c_int]
_SIGSET_BYTES = 128  # sigset_t in glibc


def _strings(items: Sequence[bytes]) -> ctypes.Array:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


def _check(code: int, what: str) -> None:
    if code != 0:
        raise OSError(code, f"{what}: {os.strerror(code)}")


def spawn(argv: Sequence[str], env: Mapping[str, str], dup2s: Sequence[tuple[int, int]], setsid: bool = True) -> int:
    """Start argv[0] (a path: no PATH search) with `env`, its descriptors as `dup2s` lists them (every other
    descriptor of this process is close-on-exec, as Python makes them); returns its pid."""
    above = max((target for _, target in dup2s), default=2) + 1
    copies = [fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, above) for source, _ in dup2s]
    actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
    attributes = ctypes.create_string_buffer(_OPAQUE_BYTES)
    try:
        _check(_libc.posix_spawn_file_actions_init(actions), "posix_spawn_file_actions_init")
        _check(_libc.posix_spawnattr_init(attributes), "posix_spawnattr_init")
        for copy, (_, target) in zip(copies, dup2s, strict=True):
            _check(_libc.posix_spawn_file_actions_adddup2(actions, copy, target), "posix_spawn_file_actions_adddup2")
        defaults = ctypes.create_string_buffer(_SIGSET_BYTES)
        _libc.sigemptyset(defaults)
        for number in DEFAULT_SIGNALS:
            _libc.sigaddset(defaults, int(number))
        _check(_libc.posix_spawnattr_setsigdefault(attributes, defaults), "posix_spawnattr_setsigdefault")
        flags = POSIX_SPAWN_SETSIGDEF | (POSIX_SPAWN_SETSID if setsid else 0)
        _check(_libc.posix_spawnattr_setflags(attributes, flags), "posix_spawnattr_setflags")
        pid = ctypes.c_int()
        path = os.fsencode(argv[0])
        _check(_libc.posix_spawn(ctypes.byref(pid), path, actions, attributes, _strings([os.fsencode(a) for a in argv]),
                                 _strings([os.fsencode(f"{name}={value}") for name, value in env.items()])),
               f"posix_spawn {argv[0]}")
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attributes)
        for copy in copies:
            os.close(copy)
