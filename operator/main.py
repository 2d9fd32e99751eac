"""Run the operator: Kopf with agentkube's settings, a metrics endpoint and a liveness probe."""

import asyncio
import ctypes
import importlib
import logging
import platform
import random
import sys
from pathlib import Path
from typing import Any

# Kopf imports the `kubernetes` client whenever it is installed: at its own import (to recognise the client's
# model objects, which this operator never hands it) and when it makes its handler registry (to offer a login
# through it; the operator has its own, `kube.login`). ~19 MiB of resident memory in a process that otherwise
# never uses it (kube.py sends raw JSON). So it is marked absent while Kopf is imported and its registry made,
# and only then: Kopf takes it for not installed, and nothing else in the process is affected.
if "kopf" not in sys.modules and "kubernetes" not in sys.modules:
    sys.modules["kubernetes"] = None  # type: ignore[assignment]
    try:
        import kopf

        kopf.get_default_registry()
    finally:
        del sys.modules["kubernetes"]

import aiohttp  # noqa: E402
import kopf  # noqa: E402
import prometheus_client  # noqa: E402

from agentkube.operator import api, gateway_settings, kube, shards  # noqa: E402

# Kopf finds handlers by their decorators, which run when these modules are imported: every module that
# declares one is listed here, and nowhere else. The models' modules (ServedModels, their Knative Services,
# capacity, the autoscaling loop) are loaded only on the shard that serves models: a shard that merely
# filtered their events out would still write Kopf's diff base on every ServedModel (Kopf stores it once no
# handler is left for a change), and could mark a new model handled before the serving shard saw it.
# Pools are sharded like sandboxes (by namespace: a pooled sandbox adopts its pool's pods in its namespace).
SANDBOX_HANDLER_MODULES = (
    "agentkube.operator.pool_handlers",
    "agentkube.operator.rechecks",
    "agentkube.operator.sandbox_handlers",
)
MODEL_HANDLER_MODULES = (
    "agentkube.operator.capacity_handlers",
    "agentkube.operator.servedmodel_handlers",
)
HANDLER_MODULES = SANDBOX_HANDLER_MODULES + MODEL_HANDLER_MODULES

PEERING_NAME = "agentkube"
# Kopf's bookkeeping annotations. Kopf ignores every annotation under its prefix when it looks for
# changes, so it must not be our API group: `agentkube.dev/last-activity` has to wake the handlers.
KOPF_PREFIX = f"kopf.{api.GROUP}"
# How long a request to the API server is retried through connection errors and 5xx before Kopf gives up
# on it. Kopf's default schedule (1, 1, 2, 3, 5, 8, 13, 21: 54 s in all) is shorter than an API server
# restart or a control-plane upgrade, and a watch that gives up ends the operator. Growing to 30 s
# between tries and ~5 minutes in all rides those out; past that the process exits and its Deployment
# (liveness) restarts it.
API_ERROR_BACKOFFS = (1, 1, 2, 3, 5, 8, 13, 21, 30, 30, 30, 30, 30, 30, 30, 30, 30)
# Kopf's own connections (its watches, Event posts, ServedModel patches). Kopf opens them without a bound,
# and each TLS connection holds a 256 KiB buffer: a thousand sandboxes' Events posted at once opened ~70
# (~19 MiB at the peak, bench/sandbox_scale.py under memray). Watches hold one each for as long as they run
# (one per watched kind: under ten), so the rest queue for the others.
KOPF_CONNECTIONS = 24
# glibc gives every new thread that allocates an arena of its own until there are 8 per core, and an arena's
# freed pages stay with it: 64 handler threads held 16 arenas (`malloc_info`, 1,000 sandboxes). The GIL already
# serialises nearly every allocation, so more than two arenas buy no speed. mallopt's M_ARENA_MAX is the setting
# MALLOC_ARENA_MAX sets from the environment.
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h
# How long Kopf keeps an object's worker task after its last event. A waiting worker still holds that event's
# whole body: with Kopf's 5 s, ~600 workers were alive at the peak of 1,000 sandboxes created at ~60/s, and
# 0.5 s cut the Python objects made after start-up from 85k to 50k (bench/operator_memory_probe.py). One
# sandbox's own events (its create, our status write, its pod's) come within a fraction of a second; a later
# one starts a new worker task.
WORKER_IDLE_SECONDS = 0.5


# Kopf logs "Handler '<id>' succeeded." at INFO after every call of every handler. The sandbox and pod event
# handlers run on every watch event, most of which ask for nothing: at 10,000 sandboxes those lines were
# 60,137 of the operator's 70,141 (bench/sandbox_scale.py), said nothing, and cost the loop their formatting
# and a write each. Their failures, and every other handler's lines, are still logged.
QUIET_HANDLERS = ("sandbox_changed", "sandbox_pod_changed")


class QuietEventHandlers(logging.Filter):
    """Drops Kopf's success line of the QUIET_HANDLERS (a filter on the `kopf.objects` logger)."""

    _quiet = frozenset(f"Handler {handler!r} succeeded." for handler in QUIET_HANDLERS)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.getMessage() not in self._quiet


def bound_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for this process (before its threads start, so none has an arena of its
    own yet). True when set; False on a C library other than glibc, which has no such arenas."""
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))


def handler_modules(shard: shards.Shard) -> tuple[str, ...]:
    return HANDLER_MODULES if shard.serves_models else SANDBOX_HANDLER_MODULES


def bounded_session(info: kopf.ConnectionInfo) -> kopf.AiohttpSession:
    """Kopf's session for the operator's credentials (`kube.login`), as Kopf builds it but with at most
    KOPF_CONNECTIONS connections. Called on Kopf's loop; Kopf logs in again on a 401."""
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=KOPF_CONNECTIONS, ssl=info.as_ssl_context()),
        headers=info.as_http_headers(), proxy=info.proxy_url, trust_env=info.trust_env)
    return kopf.AiohttpSession(aiohttp_session=session, server=info.server, default_namespace=info.default_namespace,
                               priority=info.priority, expiration=info.expiration)


def configure(settings: kopf.OperatorSettings, *, peering: str | None) -> None:
    # Progress and the last-handled spec are kept in annotations, so the status schema stays ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{api.GROUP}/finalizer"
    # Users see the Events the handlers post on purpose; Kopf's per-handler chatter only when it fails.
    settings.posting.level = logging.WARNING
    settings.execution.max_workers = kube.WORKERS
    settings.queueing.idle_timeout = WORKER_IDLE_SECONDS
    settings.watching.server_timeout = 300
    settings.networking.error_backoffs = API_ERROR_BACKOFFS
    if peering:
        settings.peering.name = peering
        # Without the peering object (a quick local run) it runs alone, with a warning; the chart makes it.
        settings.peering.mandatory = False
        settings.peering.clusterwide = True
        # Replicas must differ in priority for exactly one of them to be active; the others stand by.
        settings.peering.priority = random.randint(1, 1_000_000)
    else:
        settings.peering.standalone = True


def run(*, metrics_address: str, metrics_port: int, liveness_port: int, peering: str | None, namespace: str | None,
        prometheus_url: str | None = None, runtime_key_file: Path | None = None,
        gateway_namespace: str | None = None, node_class: str | None = None, shard: shards.Shard = shards.Shard()) -> None:
    """`peering`: the base name; shard I of N > 1 peers under `shard.peering_name(peering)`."""
    bound_malloc_arenas()
    shards.configure(shard)
    peering = shard.peering_name(peering) if peering else None

    @kopf.on.startup()
    def _startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, peering=peering)

    @kopf.on.login()
    async def _login(**_: Any) -> kopf.AiohttpSession:
        return bounded_session(kube.login())  # the credentials kube.py's requests use too

    for module in handler_modules(shard):
        importlib.import_module(module)
    if shard.serves_models:
        importlib.import_module("agentkube.operator.autoscaling_loop").configure_autoscaling(prometheus_url)
        importlib.import_module("agentkube.operator.capacity_handlers").configure_capacity(node_class, namespace)
    gateway_settings.configure_gateway(runtime_key_file, gateway_namespace)
    if metrics_port:
        prometheus_client.disable_created_metrics()
        prometheus_client.start_http_server(metrics_port, addr=metrics_address)
    kopf.configure(verbose=False)
    logging.getLogger("kopf.objects").addFilter(QuietEventHandlers())
    asyncio.run(
        kopf.operator(
            clusterwide=namespace is None,
            namespaces=[namespace] if namespace else (),
            liveness_endpoint=f"http://{metrics_address}:{liveness_port}/healthz" if liveness_port else None,
            standalone=peering is None,
            peering_name=peering,
        )
    )
