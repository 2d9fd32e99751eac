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
