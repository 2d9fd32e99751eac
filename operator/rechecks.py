"""The operator's one timer scheduler, for work that time, not an event, makes due: a sandbox's idle
suspension or expiry, a model whose Knative Service is not ready yet (its watch may start late, when
Knative is installed after us), the autoscaling loop's next decision."""

import asyncio
import contextvars
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import kopf

# An object with a recheck pending is looked at least this often, so a missed event is repaired without a restart.
RECHECK_MAX = timedelta(minutes=5)
# How long a timer whose run failed waits before it runs again.
RETRY_AFTER_FAILURE = timedelta(minutes=1)

Reconcile = Callable[[str, str, logging.Logger], Any]


class Rechecks:
    """One timer per (work, object) (the latest wins), all on the operator's loop: no daemon and no
    finalizer per object, and a thousand sandboxes cost a thousand timer handles, not a thousand tasks."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.timers: dict[tuple[str, str, str], asyncio.TimerHandle] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def schedule(self, reconcile: Reconcile, namespace: str, name: str, delay: timedelta, logger: logging.Logger) -> None:
        """Thread-safe: handlers run in worker threads. The reconciliation later runs in a copy of the
        caller's context, where Kopf keeps what posting Events needs."""
        if self.loop is not None:
            seconds = min(max(delay.total_seconds(), 0), RECHECK_MAX.total_seconds()) + 0.5
            key = (reconcile.__name__, namespace, name)
            self.loop.call_soon_threadsafe(self._arm, key, seconds, reconcile, logger, contextvars.copy_context())

    def _arm(self, key, seconds: float, reconcile: Reconcile, logger: logging.Logger, context: contextvars.Context) -> None:
        assert self.loop is not None  # armed only from the loop itself
        if key in self.timers:
            self.timers.pop(key).cancel()
        self.timers[key] = self.loop.call_later(seconds, self._fire, key, reconcile, logger, context)

    def _fire(self, key, reconcile: Reconcile, logger: logging.Logger, context: contextvars.Context) -> None:
        self.timers.pop(key, None)
        assert self.loop is not None  # fired only by the loop itself
        self.loop.run_in_executor(None, context.run, self._run, reconcile, key[1], key[2], logger)

    def _run(self, reconcile: Reconcile, namespace: str, name: str, logger: logging.Logger) -> None:
        try:
            reconcile(namespace, name, logger)
        except Exception:  # a timer has no handler to retry it: try again later rather than never
            logger.exception("rechecking %s/%s failed; retrying in a minute", namespace, name)
            self.schedule(reconcile, namespace, name, RETRY_AFTER_FAILURE, logger)


rechecks = Rechecks()


@kopf.on.startup()
async def start_rechecks(**_: Any) -> None:
    rechecks.start(asyncio.get_running_loop())
