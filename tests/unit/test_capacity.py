"""Spot-aware placement as pure functions (agentkube.operator.capacity) and the local environment's
Karpenter install (agentkube.devenv.capacity): NodePools, the revision's placement, the split, the spot
share in force, the fallback without Karpenter, and the instance types' prices."""

import pytest

from agentkube.devenv import capacity as devcapacity
from agentkube.devenv import knative
from agentkube.operator import api, capacity, servedmodel
from agentkube.rl.spot import SpotConfig


def spot(**fields) -> api.SpotCapacity:
    return api.SpotCapacity.model_validate({"enabled": True, **fields})


@pytest.mark.parametrize(("base", "share", "expected"), [
    (1, 0.8, capacity.Split(on_demand=1, spot=4)),   # Karpenter's documented 1:4
    (2, 0.5, capacity.Split(on_demand=2, spot=2)),
    (1, 0.7, capacity.Split(on_demand=1, spot=2)),   # 2/3 <= 0.7: never above the share asked for
    (3, 0.0, capacity.Split(on_demand=3, spot=0)),
    (0, 1.0, capacity.Split(on_demand=0, spot=1)),
    (0, 0.5, capacity.Split(on_demand=1, spot=1)),   # an on-demand share needs an on-demand domain
    (1, 0.99, capacity.Split(on_demand=1, spot=19)),  # capped at MAX_DOMAINS in all
])
def test_split_keeps_the_on_demand_base_and_never_exceeds_the_share(base, share, expected):
    result = capacity.split(spot(on_demand_base=base), share)
    assert result == expected
    assert result.spot_fraction <= share + 1e-9
    assert result.on_demand + result.spot <= capacity.MAX_DOMAINS


def test_the_share_in_force_is_the_policys_bounded_by_max_spot_fraction():
    assert capacity.spot_share_in_force(spot(max_spot_fraction=0.6), None) == 0.6
    assert capacity.spot_share_in_force(spot(max_spot_fraction=0.6), 0.9) == 0.6
    assert capacity.spot_share_in_force(spot(max_spot_fraction=0.6), 0.25) == 0.25
    assert capacity.spot_share_in_force(spot(max_spot_fraction=0.6), -1.0) == 0.0
    assert capacity.spot_share_in_force(api.SpotCapacity(enabled=False), 0.5) == 0.0


def test_nodepools_for_an_on_demand_base_and_spot_overflow():
    pools = capacity.nodepools("team-a", "llm", spot(on_demand_base=1, max_spot_fraction=0.8), 0.8, capacity.NodeClassRef())
    by_type = {pool["spec"]["template"]["spec"]["requirements"][0]["values"][0]: pool for pool in pools}
    assert set(by_type) == {"on-demand", "spot"}
    for capacity_type, pool in by_type.items():
        template = pool["spec"]["template"]["spec"]
        requirements = {r["key"]: r["values"] for r in template["requirements"]}
        assert requirements[capacity.CAPACITY_TYPE_LABEL] == [capacity_type]
        assert template["taints"] == [capacity.DEDICATED_TAINT]
        assert template["nodeClassRef"] == {"group": "karpenter.kwok.sh", "kind": "KWOKNodeClass", "name": "default"}
        assert pool["metadata"]["labels"][capacity.MODEL_NAME_LABEL] == "llm"
        assert pool["metadata"]["labels"][capacity.MODEL_NAMESPACE_LABEL] == "team-a"
        assert pool["spec"]["disruption"]["budgets"]
    key = capacity.spread_label("team-a", "llm")
    assert {r["key"]: r["values"] for r in by_type["on-demand"]["spec"]["template"]["spec"]["requirements"]}[key] == ["on-demand-1"]
    assert {r["key"]: r["values"] for r in by_type["spot"]["spec"]["template"]["spec"]["requirements"]}[key] == [
        "spot-1", "spot-2", "spot-3", "spot-4"]
    # A spot node goes two minutes after its notice: draining it for longer gains nothing.
    assert by_type["spot"]["spec"]["template"]["spec"]["terminationGracePeriod"] == "120s"
    assert by_type["on-demand"]["spec"]["disruption"]["budgets"] == [{"nodes": "1"}]


def test_no_spot_pool_at_a_share_of_zero():
    pools = capacity.nodepools("ns", "m", spot(on_demand_base=2), 0.0, capacity.NodeClassRef())
    assert [p["metadata"]["name"] for p in pools] == ["ns-m-on-demand"]


def test_nodepool_names_fit_a_label_value_and_stay_distinct():
    long_a, long_b = "n" * 63, "m" * 63
    names = {capacity.nodepool_name(long_a, long_b, t) for t in ("on-demand", "spot")}
    names |= {capacity.nodepool_name(long_a, long_b[:-1] + "x", "spot")}
    assert len(names) == 3
    assert all(len(name) <= 63 and name[0].isalnum() for name in names)


def test_karpenter_placement_spreads_over_the_domains_on_the_models_pools_only():
    fields = capacity.placement("ns", "m", spot(), "karpenter", servedmodel.MODEL_LABEL)
    terms = fields["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": capacity.NODEPOOL_LABEL, "operator": "In",
                                            "values": ["ns-m-on-demand", "ns-m-spot"]}]}]
    # On-demand preferred: Karpenter takes a preference as a requirement until it cannot, so the base fills first.
    assert fields["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 100, "preference": {"matchExpressions": [{"key": capacity.CAPACITY_TYPE_LABEL, "operator": "In",
                                                             "values": [capacity.ON_DEMAND]}]}}]
    assert fields["tolerations"] == [capacity.DEDICATED_TOLERATION]
    assert fields["topologySpreadConstraints"] == [{
        "maxSkew": 1, "topologyKey": capacity.spread_label("ns", "m"), "whenUnsatisfiable": "DoNotSchedule",
        "labelSelector": {"matchLabels": {servedmodel.MODEL_LABEL: "m"}}}]
    # The share lives in the NodePools: the same placement whatever it is, so no new Revision.
    assert fields == capacity.karpenter_placement("ns", "m", servedmodel.MODEL_LABEL)


def test_without_spot_pods_stay_off_every_providers_spot_nodes():
    fields = capacity.placement("ns", "m", api.SpotCapacity(enabled=False), "karpenter", servedmodel.MODEL_LABEL)
    expressions = fields["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"][0]["matchExpressions"]
    assert {(e["key"], e["operator"], tuple(e["values"])) for e in expressions} == {
        ("karpenter.sh/capacity-type", "NotIn", ("spot",)),
        ("eks.amazonaws.com/capacityType", "NotIn", ("SPOT",)),
        ("cloud.google.com/gke-spot", "NotIn", ("true",)),
        ("kubernetes.azure.com/scalesetpriority", "NotIn", ("spot",)),
    }
    assert "tolerations" not in fields


def test_without_karpenter_spot_pods_prefer_spot_labels_and_tolerate_spot_taints():
    fields = capacity.placement("ns", "m", spot(), "labels", servedmodel.MODEL_LABEL)
    preferred = fields["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert {p["preference"]["matchExpressions"][0]["key"] for p in preferred} == {
        key for key, _, _ in capacity.WELL_KNOWN_SPOT_LABELS}
    assert {t["key"] for t in fields["tolerations"]} == {"cloud.google.com/gke-spot", "kubernetes.azure.com/scalesetpriority"}
    assert "topologySpreadConstraints" not in fields


def test_the_condition_says_which_placement_is_in_force():
    assert capacity.capacity_condition(api.SpotCapacity(), "karpenter", None)[1:3] == (True, "SpotDisabled")
    assert capacity.capacity_condition(spot(), "labels", None)[1:3] == (False, "KarpenterNotInstalled")
    applied = capacity.capacity_condition(spot(), "karpenter", capacity.Split(1, 4))
    assert applied[1:3] == (True, "NodePoolsApplied") and "0.80" in applied[3]


def test_the_knative_service_carries_the_placement():
    body = {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}, "apiVersion": api.API_VERSION, "kind": "ServedModel"}
    spec = api.ServedModelSpec.model_validate({"model": {"name": "x"}, "image": "i", "capacity": {"spot": {"enabled": True}}})
    fields = capacity.placement("ns", "m", spec.capacity.spot, "karpenter", servedmodel.MODEL_LABEL)
    pod_spec = servedmodel.knative_service_manifest(body, spec, 10, fields)["spec"]["template"]["spec"]
    assert pod_spec["topologySpreadConstraints"] == fields["topologySpreadConstraints"]
    assert pod_spec["containers"][0]["name"] == "model"
    # The spread selects the revision's pods by the label the template gives them.
    template_labels = servedmodel.knative_service_manifest(body, spec, 10, fields)["spec"]["template"]["metadata"]["labels"]
    assert template_labels[servedmodel.MODEL_LABEL] == "m"


def test_holds_ignores_what_the_api_server_defaulted():
    wanted = {"a": 1, "b": [{"k": "x"}]}
    assert capacity.holds({"a": 1, "b": [{"k": "x", "default": 2}], "c": 3}, wanted)
    assert not capacity.holds({"a": 2, "b": [{"k": "x"}]}, wanted)
    assert not capacity.holds({"a": 1, "b": []}, wanted)


def test_node_class_parses_group_kind_name():
    assert capacity.NodeClassRef.parse("karpenter.k8s.aws/EC2NodeClass/default") == capacity.NodeClassRef(
        "karpenter.k8s.aws", "EC2NodeClass", "default")
    with pytest.raises(ValueError, match="group/Kind/name"):
        capacity.NodeClassRef.parse("EC2NodeClass/default")


def test_instance_types_price_spot_at_the_simulators_discount():
    config = SpotConfig()
    types = devcapacity.instance_types(config)
    assert types
    for instance_type in types:
        prices: dict[str, set[float]] = {}
        for offering in instance_type["offerings"]:
            kind = next(r["values"][0] for r in offering["Requirements"] if r["key"] == "karpenter.sh/capacity-type")
            prices.setdefault(kind, set()).add(offering["Price"])
        assert len(prices["spot"]) == len(prices["on-demand"]) == 1  # the same in every zone
        ratio = prices["spot"].pop() / prices["on-demand"].pop()
        assert ratio == pytest.approx(config.spot_price_per_hour / config.on_demand_price_per_hour, rel=1e-4)
    smallest = min(types, key=lambda t: int(t["resources"]["cpu"]))
    assert {o["Price"] for o in smallest["offerings"]} == {config.spot_price_per_hour, config.on_demand_price_per_hour}


def test_knative_allows_the_pod_spec_fields_placement_uses():
    adapted = knative.adapt([{"kind": "ConfigMap", "metadata": {"name": "config-features"}, "data": {"_example": "..."}}],
                            knative.images_by_ko_path())
    features = adapted[0]["data"]
    for field in ("affinity", "tolerations", "topologyspreadconstraints"):
        assert features[f"kubernetes.podspec-{field}"] == "enabled"


def test_karpenters_chart_values_use_the_local_image_and_the_instance_types_file():
    values = devcapacity.chart_values()
    assert f"{values['controller']['image']['repository']}:{values['controller']['image']['tag']}" == devcapacity.IMAGE
    env = {e["name"]: e["value"] for e in values["controller"]["env"]}
    assert env["INSTANCE_TYPES_FILE_PATH"].startswith(devcapacity.INSTANCE_TYPES_MOUNT)
    assert values["imagePullPolicy"] == "Never"


def test_kwok_manages_only_karpenters_nodes():
    argv = devcapacity.kwok_command(devcapacity.Path("/bin/kwok"), devcapacity.Path("/k"), devcapacity.Path("/c"))
    assert f"--manage-nodes-with-annotation-selector={devcapacity.KWOK_NODE_ANNOTATION}" in argv
    assert not any(arg.startswith("--manage-all-nodes") or arg.startswith("--server-address") for arg in argv)


def test_each_model_spreads_over_a_key_of_its_own():
    """Karpenter counts a spread's domains over every NodePool with the key: a shared key would let another
    model's empty values hold this model to one pod per value."""
    keys = {capacity.spread_label(ns, name) for ns, name in (("a", "m"), ("b", "m"), ("a", "n"), ("ab", "c"), ("a", "bc"))}
    assert len(keys) == 5
    for key in keys:
        prefix, label_name = key.split("/")
        assert prefix == capacity.SPREAD_LABEL_PREFIX and len(label_name) <= 63 and label_name.isalnum()


def test_the_startup_sweep_finds_the_pools_of_models_that_are_gone_and_nothing_else():
    spot = api.SpotCapacity(enabled=True, on_demand_base=1, max_spot_fraction=0.5)
    kept = capacity.nodepools("ns", "kept", spot, 0.5, capacity.NodeClassRef())
    gone = capacity.nodepools("ns", "gone", spot, 0.5, capacity.NodeClassRef())
    elsewhere = capacity.nodepools("other", "gone", spot, 0.5, capacity.NodeClassRef())
    someone_elses = {"metadata": {"name": "team-pool", "labels": {capacity.MODEL_NAME_LABEL: "gone",
                                                                  capacity.MODEL_NAMESPACE_LABEL: "ns"}}}
    pools = [*kept, *gone, *elsewhere, someone_elses]
    models = {("ns", "kept")}
    assert capacity.orphaned_nodepools(pools, models, None) == sorted(
        p["metadata"]["name"] for p in [*gone, *elsewhere])
    # An operator that watches one namespace judges only that namespace's pools.
    assert capacity.orphaned_nodepools(pools, models, "ns") == sorted(p["metadata"]["name"] for p in gone)
    assert capacity.orphaned_nodepools(pools, {("ns", "kept"), ("ns", "gone"), ("other", "gone")}, None) == []


def test_usage_counts_bound_pods_by_their_nodes_capacity_type_and_prices_the_models_nodes():
    nodes = {
        "od": {capacity.CAPACITY_TYPE_LABEL: "on-demand", capacity.NODEPOOL_LABEL: "ns-m-on-demand", capacity.PRICE_LABEL: "1.006"},
        "sp": {capacity.CAPACITY_TYPE_LABEL: "spot", capacity.NODEPOOL_LABEL: "ns-m-spot", capacity.PRICE_LABEL: "0.350000"},
        "gke-spot": {"cloud.google.com/gke-spot": "true"},  # another provider's spot node, not the model's pools
        "unpriced": {capacity.CAPACITY_TYPE_LABEL: "spot", capacity.NODEPOOL_LABEL: "ns-m-spot"},
        "other-model": {capacity.NODEPOOL_LABEL: "ns-x-spot", capacity.PRICE_LABEL: "9"},
    }

    def pod(node=None, deleting=False):
        return {"metadata": {"deletionTimestamp": "2026-11-30T00:00:00Z"} if deleting else {}, "spec": {"nodeName": node}}

    pods = [pod("od"), pod("od"), pod("sp"), pod("gke-spot"), pod(), pod("sp", deleting=True), pod("gone")]
    found = capacity.usage(pods, nodes, {"ns-m-on-demand", "ns-m-spot"})
    assert found == capacity.Usage(on_demand_pods=2, spot_pods=2, cost_per_hour=1.356, unpriced_nodes=1)
    assert capacity.capacity_type_of({}) == "on-demand"
