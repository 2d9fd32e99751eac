"""The newest copy of each object this process knows, from its watch events and from the replies to its own
writes: reads served from memory instead of the API server, and one lock per object so that the handlers of
its different events (its own, its pod's, a timer's) never reconcile it at the same time.

Why both sources: a reply to our status write is newer than anything the watch has delivered yet, and the
watch event of that write arrives later (or, under load, much later); a reconciliation started meanwhile
from an older copy would see the status as it was before the write and write it (and its Event) again.
Which copy is newer is decided by `metadata.resourceVersion`: an etcd-backed API server makes it from
etcd's revision, an integer that only grows. Clients are told to treat it as opaque, so a version that is
not an integer is never taken for older: the copy that came last wins, as it would without this store."""

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

Key = tuple[str, str]  # (namespace, name)


def resource_version(body: dict[str, Any]) -> int | None:
    try:
        return int(body["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None


def is_newer(candidate: dict[str, Any], current: tuple[str | None, int | None] | None) -> bool:
    """Whether `candidate` should replace the copy known by its (uid, resourceVersion) `current` (a
    different object of the same name, one recreated meanwhile, always does: its uid tells)."""
    if current is None or candidate["metadata"].get("uid") != current[0]:
        return True
    new = resource_version(candidate)
    return new is None or current[1] is None or new >= current[1]


class Latest:
    """Thread-safe: the watch's events arrive on Kopf's loop, writes return in handler threads. Copies are
    kept as compact JSON, not as parsed dicts: a sandbox is ~1.6 KB of JSON but ~8.7 KiB of Python dicts
    and strings (tracemalloc), which at 10,000 sandboxes is the difference between ~17 and ~87 MiB; a copy
    is parsed again (tens of microseconds) only when a reconciliation asks for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._copies: dict[Key, tuple[str | None, int | None, str]] = {}  # uid, resourceVersion, JSON
        self._object_locks: dict[Key, threading.Lock] = {}
        self._users: dict[Key, int] = {}

    def saw(self, body: dict[str, Any]) -> dict[str, Any]:
        """Record a copy (an event's, or a write's reply) unless a newer one is known; the newest. Kept
        without `metadata.managedFields`: the field managers' record is ~40% of a sandbox's JSON, and no
        reconciliation reads it."""
        metadata = body["metadata"]
        if "managedFields" in metadata:
            body = {**body, "metadata": {k: v for k, v in metadata.items() if k != "managedFields"}}
        key = (metadata["namespace"], metadata["name"])
        with self._lock:
            current = self._copies.get(key)
            if is_newer(body, current[:2] if current is not None else None):
                self._copies[key] = (metadata.get("uid"), resource_version(body), json.dumps(body, separators=(",", ":")))
                return body
        assert current is not None  # only a known copy can be newer
        return dict(json.loads(current[2]))

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            current = self._copies.get((namespace, name))
        return dict(json.loads(current[2])) if current is not None else None

    def knows(self, namespace: str, name: str) -> bool:
        with self._lock:
            return (namespace, name) in self._copies

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._copies.pop((namespace, name), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._copies)

    @contextmanager
    def exclusive(self, namespace: str, name: str) -> Iterator[None]:
        """Hold the object's own lock; locks exist only while someone holds or waits for them."""
        key = (namespace, name)
        with self._lock:
            lock = self._object_locks.setdefault(key, threading.Lock())
            self._users[key] = self._users.get(key, 0) + 1
        try:
            with lock:
                yield
        finally:
            with self._lock:
                self._users[key] -= 1
                if not self._users[key]:
                    del self._users[key], self._object_locks[key]
