"""Sharding the operator by namespace: the shard function is the same in every process and spreads
namespaces evenly; a shard other than 0 never loads the ServedModel handlers."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from agentkube.operator import main, shards
from agentkube.operator.shards import Shard, shard_of

NAMESPACES = [f"team-{i}" for i in range(20_000)]


def test_the_shard_of_a_namespace_is_the_same_in_every_process():
    # Python's hash() of a str differs between processes (PYTHONHASHSEED); the shard must not.
    script = ("import json, sys; from agentkube.operator.shards import shard_of; "
              "print(json.dumps([shard_of(n, 7) for n in json.loads(sys.stdin.read())]))")
    sample = NAMESPACES[:500] + ["default", "kube-system", "a", "ünïcode-ns"]
    here = [shard_of(n, 7) for n in sample]
    for seed in ("1", "2", "random"):
        other = subprocess.run([sys.executable, "-c", script], input=json.dumps(sample), capture_output=True, text=True,
                               check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        assert json.loads(other.stdout) == here
    # Pinned, so that a change of the function (which would move every namespace) is a deliberate one.
    pinned = ("default", "team-0", "team-1", "team-2", "team-3", "team-4")
    assert [shard_of(n, 2) for n in pinned] == [1, 0, 0, 0, 0, 1]
    assert [shard_of(n, 5) for n in pinned] == [4, 4, 3, 3, 2, 3]


@pytest.mark.parametrize("count", [2, 3, 4, 8, 16])
def test_namespaces_spread_evenly_over_the_shards(count):
    per_shard = Counter(shard_of(n, count) for n in NAMESPACES)
    assert sorted(per_shard) == list(range(count))
    expected = len(NAMESPACES) / count
    # A uniform hash gives each shard a binomial count: every shard within 4 standard deviations of its share.
    sigma = (len(NAMESPACES) * (1 / count) * (1 - 1 / count)) ** 0.5
    assert all(abs(n - expected) < 4 * sigma for n in per_shard.values()), per_shard


def test_every_namespace_has_exactly_one_owning_shard():
    for count in (1, 2, 5):
        for namespace in NAMESPACES[:2000]:
            assert sum(Shard(i, count).owns(namespace) for i in range(count)) == 1


def test_one_shard_is_todays_operator():
    only = Shard.parse("0/1")
    assert only == Shard()
    assert only.owns("anything") and only.owns(None)
    assert only.serves_models
    assert only.peering_name(main.PEERING_NAME) == main.PEERING_NAME
    assert main.handler_modules(only) == main.HANDLER_MODULES


def test_each_shard_peers_in_its_own_group_and_only_shard_0_serves_models():
    assert [Shard(i, 3).peering_name("agentkube") for i in range(3)] == [
        "agentkube-shard-0", "agentkube-shard-1", "agentkube-shard-2"]
    assert Shard(0, 3).serves_models and not Shard(1, 3).serves_models
    assert set(main.handler_modules(Shard(1, 3))) == set(main.SANDBOX_HANDLER_MODULES)
    assert not set(main.handler_modules(Shard(1, 3))) & set(main.MODEL_HANDLER_MODULES)


@pytest.mark.parametrize("text", ["1/1", "2/2", "0/0", "-1/2", "a/b", "1", "1/2/3", ""])
def test_malformed_or_impossible_shards_are_refused(text):
    with pytest.raises(ValueError, match="shard"):
        Shard.parse(text)


def test_the_sandbox_filter_passes_only_this_shards_namespaces():
    try:
        shards.configure(Shard(1, 2))
        for namespace in NAMESPACES[:200]:
            assert shards.in_this_shard(namespace=namespace, name="x") == (shard_of(namespace, 2) == 1)
    finally:
        shards.configure(Shard())


def test_a_shard_other_than_0_registers_no_handler_of_served_models_nodes_or_knative():
    # In a fresh process, as `agentkube operator run --shard 1/2` loads its handlers.
    script = """
import importlib, json, sys, kopf
from agentkube.operator import commands, main, shards
for module in main.handler_modules(shards.Shard(1, 2)):
    importlib.import_module(module)
registry = kopf.get_default_registry()
handlers = [*registry._changing.get_all_handlers(), *registry._watching.get_all_handlers()]
print(json.dumps({"plurals": sorted({h.selector.any_name for h in handlers}),
                  "ids": sorted({h.id for h in [*handlers, *registry._activities.get_all_handlers()]}),
                  "loaded": sorted(m for m in sys.modules if m.startswith("agentkube.operator.")),
                  "unfiltered": sorted(h.id for h in handlers if h.when is not shards.in_this_shard)}))
"""
    found = json.loads(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert found["plurals"] == ["agentsandboxes", "agentsandboxpools", "pods"]
    # Sandboxes, their pods and pools are all reconciled by the shard that owns their namespace.
    assert found["unfiltered"] == []
    assert "sweep_orphaned_nodepools" not in found["ids"]
    assert {"sandbox_changed", "sandbox_pod_changed", "pool_changed", "pool_event", "start_rechecks"} <= set(found["ids"])
    assert not {"agentkube.operator.capacity_handlers", "agentkube.operator.servedmodel_handlers",
                "agentkube.operator.autoscaling_loop"} & set(found["loaded"])
