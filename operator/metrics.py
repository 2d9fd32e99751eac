"""The operator's own Prometheus metrics. Labels are bounded: the kind and the result, never an object's
name."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "agentkube_operator_reconciles_total", "Reconciliations by kind and result (success or error).", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "agentkube_operator_reconcile_seconds", "Time one reconciliation takes, by kind.", ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


@contextmanager
def reconciling(kind: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    except Exception:
        RECONCILES.labels(kind, "error").inc()
        raise
    else:
        RECONCILES.labels(kind, "success").inc()
    finally:
        RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
