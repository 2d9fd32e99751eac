"""What the gateway knows of AgentSandboxes, kept current by one watch, so that a call to a running sandbox
reads nothing from the API server: before, every call read its sandbox and its pod (two requests, about as
long as the call itself).

Only AgentSandboxes are watched (the gateway may already get and patch every one): the operator writes in
each running sandbox's `status.runtime` what the gateway needs of the pod (its address, and the name and
identity the runtime's token is derived from), so the gateway needs no list or watch of pods, which RBAC
could not narrow to sandbox pods.

One thread lists, then watches from the list's resourceVersion with bookmarks, applies each event to a
dict and lists again when the watch expires (410) or breaks. The cache is **current** only after its first
list and while its watch is healthy: each watch request asks the API server to end it after WATCH_SECONDS,
so one still open WATCH_GRACE_SECONDS past that is broken however quiet it is (a connection lost without a
reset says nothing), and the socket's read timeout gets the thread out of it. Only what the gateway's
decisions read is kept of each object (`slim`), so tens of thousands of sandboxes cost little memory.

The cache is a hint, never the last word: the gateway uses an entry only when it is current and says the
sandbox runs at an address and needs no resume, and the runtime there must still prove itself before it is
sent anything (contract.runtime_proof); otherwise, or when that fails (`distrust`), the direct reads decide.
Applying events and judging currency are pure functions; the thread does the I/O.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

logger = logging.getLogger("agentkube.gateway")

Key = tuple[str, str]  # (namespace, name)
Store = dict[Key, dict[str, Any]]
WATCH_SECONDS = 60  # one watch request's length (timeoutSeconds); the watch then resumes from its last version
WATCH_GRACE_SECONDS = 5.0  # past its length, an open watch is broken: the API server ends it on time
CONNECT_SECONDS = 10.0
RETRY_SECONDS = (0.5, 10.0)  # backoff after a failed list or watch: first, longest


def slim(sandbox: dict[str, Any]) -> dict[str, Any]:
    """What the gateway's decisions read of an AgentSandbox (gateway.cached_target, resume_patch,
    with_sandbox_env): no template, no annotations, no managed fields."""
    metadata, spec, status = sandbox.get("metadata") or {}, sandbox.get("spec") or {}, sandbox.get("status") or {}
    kept_metadata = {key: metadata.get(key) for key in ("name", "namespace", "uid", "resourceVersion")}
    if metadata.get("deletionTimestamp"):
        kept_metadata["deletionTimestamp"] = metadata["deletionTimestamp"]
    kept_spec = {key: spec[key] for key in ("pool", "env", "lifecycle") if key in spec}
    kept_status = {key: status[key] for key in ("phase", "podName", "runtime") if key in status}
    return {"metadata": kept_metadata, "spec": kept_spec, "status": kept_status}


def key_of(obj: dict[str, Any]) -> Key:
    metadata = obj.get("metadata") or {}
    return metadata.get("namespace") or "", metadata.get("name") or ""


def apply_event(store: Store, event: dict[str, Any]) -> str | None:
    """Apply one watch event to the store; returns the resourceVersion to resume from (None: the event
    carries none). ADDED/MODIFIED keep the slimmed object, DELETED drops it, BOOKMARK only moves the version."""
    kind, obj = event.get("type"), event.get("object") or {}
    version = (obj.get("metadata") or {}).get("resourceVersion")
    if kind in ("ADDED", "MODIFIED"):
        store[key_of(obj)] = slim(obj)
    elif kind == "DELETED":
        store.pop(key_of(obj), None)
    return version


def is_current(listed: bool, watch_ends_by: float | None, now: float) -> bool:
    """Whether the cache may be used: a first list is in and the watch it follows is open within its time."""
    return listed and watch_ends_by is not None and now <= watch_ends_by


class WatchError(Exception):
    """An ERROR event: the watch must start again (410: from a new list)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class SandboxWatch:
    """Every AgentSandbox, listed and then watched in a daemon thread. `lister(**kwargs)` is the client's
    list of all namespaces (called with `_preload_content=False`, and `watch=True` to watch)."""

    def __init__(self, lister: Callable[..., Any], clock: Callable[[], float] = time.monotonic):
        self.lister, self.clock = lister, clock
        self._store: Store = {}
        self._listed = False
        self._ends_by: float | None = None  # when the open watch (or the list before it) stops being current
        self._distrusted: dict[Key, str | None] = {}  # entries a runtime failed for, by their resourceVersion
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch-agentsandboxes", daemon=True)

    def start(self) -> SandboxWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()

    def current(self) -> bool:
        return is_current(self._listed, self._ends_by, self.clock())

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The sandbox as last seen (slimmed); None when unknown, while the cache is not current, or when a
        call found its entry wrong and no newer version of it has come since (`distrust`)."""
        if not self.current():
            return None
        entry = self._store.get((namespace, name))
        if entry is None or ((namespace, name) in self._distrusted
                             and self._distrusted[(namespace, name)] == entry["metadata"].get("resourceVersion")):
            return None
        return entry

    def distrust(self, namespace: str, name: str, version: str | None) -> None:
        """This version of the sandbox led a call astray (nobody, or not its runtime, at its address): the
        direct reads decide until a newer version comes in."""
        self._distrusted[(namespace, name)] = version
        if len(self._distrusted) > 4096:  # bounded: the oldest distrust first (dicts keep insertion order)
            self._distrusted.pop(next(iter(self._distrusted)))

    def _list(self) -> str:
        self._ends_by = self.clock() + CONNECT_SECONDS + WATCH_GRACE_SECONDS
        response = self.lister(_preload_content=False, _request_timeout=(CONNECT_SECONDS, WATCH_SECONDS))
        try:
            listed = json.loads(response.data)
        finally:
            response.release_conn()
        # A new dict swapped in whole: readers (the gateway's event loop) never see it half made.
        self._store = {key_of(item): slim(item) for item in listed.get("items") or ()}
        self._listed = True
        return str(listed["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        self._ends_by = self.clock() + WATCH_SECONDS + WATCH_GRACE_SECONDS
        response = self.lister(_preload_content=False, watch=True, resource_version=version, allow_watch_bookmarks=True,
                               timeout_seconds=WATCH_SECONDS,
                               _request_timeout=(CONNECT_SECONDS, WATCH_SECONDS + WATCH_GRACE_SECONDS))
        try:
            for line in iter_resp_lines(response):
                if self._stopped.is_set():
                    break
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise WatchError(int(status.get("code") or 500), str(status.get("message") or status))
                version = apply_event(self._store, event) or version
        finally:
            response.close()
            response.release_conn()
        return version

    def _run(self) -> None:
        delay = RETRY_SECONDS[0]
        version: str | None = None
        while not self._stopped.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch(version)
                delay = RETRY_SECONDS[0]
            except Exception as error:  # any failure: list again (after a pause); calls read directly meanwhile
                self._listed, self._ends_by = False, None
                if not (isinstance(error, WatchError) and error.code == 410):
                    logger.warning("watch of agentsandboxes: %s: %s; listing again in %.1fs", type(error).__name__,
                                   str(error)[:200], delay)
                    self._stopped.wait(delay)
                    delay = min(RETRY_SECONDS[1], delay * 2)
                version = None
