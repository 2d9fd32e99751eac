"""Kopf finds every handler: each operator module that declares one is imported by `agentkube operator run`."""

import importlib
import re
from pathlib import Path

import kopf

from agentkube.operator import main

OPERATOR = Path(main.__file__).resolve().parent


def test_every_module_with_a_kopf_handler_is_loaded():
    declaring = {f"agentkube.operator.{path.stem}" for path in OPERATOR.glob("*.py")
                 if re.search(r"^@kopf\.on\.", path.read_text(), re.MULTILINE)}
    assert declaring == set(main.HANDLER_MODULES)


def test_the_handlers_register_with_kopf():
    for module in main.HANDLER_MODULES:
        importlib.import_module(module)
    registry = kopf.get_default_registry()
    changing = {h.id for h in registry._changing.get_all_handlers()}
    watching = {h.id for h in registry._watching.get_all_handlers()}
    activities = {h.id for h in registry._activities.get_all_handlers()}
    assert "served_model_changed" in changing
    # Sandboxes are level-triggered from their events: no change handler, so Kopf writes no diff base on them.
    assert {"sandbox_changed", "sandbox_pod_changed", "knative_service_changed"} <= watching
    assert "sandbox_changed" not in changing
    assert "start_rechecks" in activities


def test_kopfs_success_line_of_the_per_event_handlers_is_dropped_and_everything_else_kept():
    import logging

    from agentkube.operator.main import QuietEventHandlers

    def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("kopf.objects", level, __file__, 1, message, None, None)

    quiet = QuietEventHandlers()
    assert not quiet.filter(record("Handler 'sandbox_changed' succeeded."))
    assert not quiet.filter(record("Handler 'sandbox_pod_changed' succeeded."))
    assert quiet.filter(record("Handler 'served_model_changed' succeeded."))  # a change handler's: kept
    assert quiet.filter(record("created pod ns/box"))
    assert quiet.filter(record("Handler 'sandbox_changed' failed with an exception. Will retry.", logging.ERROR))
