"""Cost per hour of a served model's capacity on real Karpenter (its KWOK provider), side by side in one
run: on-demand only, a fixed spot share, and the PPO policy's spot share (bounded by maxSpotFraction) —
and the same three from the simulator for the same day, to show where the simulator's spot model and
Karpenter disagree.

1. The simulator replays a held-out evaluation day under the exported policy (its targets, every 30 s, as
   the operator runs it), recording the revision's ready pods and the policy's spot share.
2. The day is compressed into `--steps` blocks. For each block, three Deployments — one per strategy —
   run the block's pod count (its mean, rounded up) with the operator's own placement and NodePools
   (agentkube.operator.capacity, the split from the block's share), one pod per 1-GPU node as the
   simulator assumes (each pod asks for `nvidia.com/gpu: 1`). Once every pod is bound, the NodeClaims
   of each strategy's pools are priced from the instance types the environment gave Karpenter (the
   simulator's prices), and the cost per hour is recorded.

The nodes are kwok's: no pod runs. Karpenter decides for real what to launch and where pods go.
Writes bench/results/capacity_cost.{json,md}. Needs the node (hold the lock):

    flock /tmp/agentkube-node.lock .venv/bin/python bench/capacity_cost.py --steps 12
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import kubernetes
import numpy as np
from kubernetes.client import ApiException

from agentkube.devenv import capacity as devcapacity
from agentkube.devenv import temporary_env
from agentkube.operator import api, capacity
from agentkube.rl.episodes import run_episode
from agentkube.rl.observation import Decision
from agentkube.rl.policy import load_policy
from agentkube.rl.simulator import SimConfig
from agentkube.rl.traces import evaluation_trace

RESULTS = Path(__file__).parent / "results"
NAMESPACE = "capacity-bench"
MODEL_LABEL = "agentkube.dev/served-model"
MAX_SPOT_FRACTION = 0.8
ON_DEMAND_BASE = 1
FIXED_SHARE = 0.5


@dataclass
class RecordingPolicy:
    """The exported policy with its spot share bounded as the operator bounds it (and recorded), or
    replaced by a fixed share (its targets kept, so every strategy runs the same pods)."""

    fixed_share: float | None = None
    shares: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.policy = load_policy()

    def decide(self, observation: np.ndarray) -> Decision:
        decision = self.policy.decide(observation, spot_allowed=True)
        share = min(decision.spot_share, MAX_SPOT_FRACTION) if self.fixed_share is None else self.fixed_share
        self.shares.append(share)
        return Decision(decision.target, share)


def simulate(workload: str, steps: int) -> tuple[dict[str, float], list[int], list[float]]:
    """Per-hour cost of each strategy in the simulator, the pods per block and the policy's share per block."""
    trace, config = evaluation_trace(workload), SimConfig()
    costs, pods, shares = {}, [], []
    for strategy, fixed in (("on-demand only", 0.0), (f"fixed share {FIXED_SHARE}", FIXED_SHARE), ("policy share", None)):
        policy = RecordingPolicy(fixed)
        summary, sim, _ = run_episode(policy, trace, config, spot_allowed=True)
        costs[strategy] = summary.cost / (trace.duration_s / 3600.0)
        if fixed is None:
            blocks = np.array_split(sim.ready_series, steps)
            pods = [max(1, math.ceil(float(block.mean()))) for block in blocks]
            shares = [float(np.mean(block)) for block in np.array_split(np.array(policy.shares), steps)]
    return costs, pods, shares


def _prices() -> dict[tuple[str, str], float]:
    prices = {}
    for instance_type in devcapacity.instance_types():
        for offering in instance_type["offerings"]:
            kind = next(r["values"][0] for r in offering["Requirements"] if r["key"] == capacity.CAPACITY_TYPE_LABEL)
            prices[(instance_type["name"], kind)] = offering["Price"]
    return prices


def _deployment(name: str, replicas: int) -> dict:
    placement = capacity.karpenter_placement(NAMESPACE, name, MODEL_LABEL)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "namespace": NAMESPACE},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {MODEL_LABEL: name}},
                     "template": {"metadata": {"labels": {MODEL_LABEL: name}},
                                  "spec": {**placement, "containers": [{
                                      "name": "model", "image": "dev.local/never-runs:1",
                                      "resources": {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}}]}}}}


def _apply_pools(custom, name: str, share: float) -> None:
    spot = api.SpotCapacity(enabled=True, on_demand_base=ON_DEMAND_BASE, max_spot_fraction=MAX_SPOT_FRACTION)
    wanted = capacity.nodepools(NAMESPACE, name, spot, share, capacity.NodeClassRef())
    names = {pool["metadata"]["name"] for pool in wanted}
    for pool in wanted:
        try:
            custom.create_cluster_custom_object(capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION, capacity.NODEPOOLS, pool)
        except ApiException as error:
            if error.status != 409:
                raise
            custom.patch_cluster_custom_object(capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION, capacity.NODEPOOLS,
                                               pool["metadata"]["name"], {"spec": pool["spec"]})
    for kind in (capacity.ON_DEMAND, capacity.SPOT):
        stale = capacity.nodepool_name(NAMESPACE, name, kind)
        if stale not in names:
            try:
                custom.delete_cluster_custom_object(capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION, capacity.NODEPOOLS, stale)
            except ApiException as error:
                if error.status != 404:
                    raise


def measure_karpenter(pods: list[int], shares: list[float], settle_s: float, hold_s: float) -> list[dict]:
    strategies = {"on-demand-only": lambda h: 0.0, "fixed-share": lambda h: FIXED_SHARE, "policy-share": lambda h: shares[h]}
    prices = _prices()
    rows = []
    with temporary_env(with_capacity=True, with_prometheus=False) as env:
        kubernetes.config.load_kube_config(str(env.kubeconfig))
        core, apps, custom = kubernetes.client.CoreV1Api(), kubernetes.client.AppsV1Api(), kubernetes.client.CustomObjectsApi()
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        for step, count in enumerate(pods):
            started = time.monotonic()
            for name, share_of in strategies.items():
                _apply_pools(custom, name, share_of(step))
                try:
                    apps.create_namespaced_deployment(NAMESPACE, _deployment(name, count))
                except ApiException as error:
                    if error.status != 409:
                        raise
                    apps.patch_namespaced_deployment_scale(name, NAMESPACE, {"spec": {"replicas": count}})
            # Until every strategy's pods are bound (or the step's time is up), then price the NodeClaims.
            while time.monotonic() - started < settle_s:
                listed = core.list_namespaced_pod(NAMESPACE).items
                live = [p for p in listed if not p.metadata.deletion_timestamp]
                if len(live) == count * len(strategies) and all(p.spec.node_name for p in live):
                    break
                time.sleep(2)
            bound_s = time.monotonic() - started
            # Then the step lasts `hold_s` in all, so that Karpenter can consolidate what a scale-down emptied
            # (after the pools' consolidateAfter): without it a compressed day pays for its peak to the end.
            time.sleep(max(0.0, hold_s - (time.monotonic() - started)))
            claims = custom.list_cluster_custom_object(capacity.KARPENTER_GROUP, capacity.KARPENTER_VERSION, capacity.NODECLAIMS)["items"]
            nodes = {n.metadata.name: n.metadata.labels or {} for n in core.list_node().items}
            placed: dict[tuple[str, str], int] = {}
            in_use: set[str] = set()  # nodes with a pod bound (NodeClaims emptied wait a minute to be consolidated)
            for p in core.list_namespaced_pod(NAMESPACE).items:
                if p.spec.node_name and not p.metadata.deletion_timestamp:
                    key = (p.metadata.labels[MODEL_LABEL], nodes.get(p.spec.node_name, {}).get(capacity.CAPACITY_TYPE_LABEL, "?"))
                    placed[key] = placed.get(key, 0) + 1
                    in_use.add(p.spec.node_name)
            for name in strategies:
                pools = {capacity.nodepool_name(NAMESPACE, name, kind) for kind in (capacity.ON_DEMAND, capacity.SPOT)}
                mine = [c for c in claims if c["metadata"].get("labels", {}).get(capacity.NODEPOOL_LABEL) in pools]
                def price(claim: dict) -> float:
                    labels = claim["metadata"]["labels"]
                    return prices.get((labels.get("node.kubernetes.io/instance-type", ""),
                                       labels.get(capacity.CAPACITY_TYPE_LABEL, "")), 0.0)

                cost = sum(price(c) for c in mine)
                cost_in_use = sum(price(c) for c in mine if (c.get("status") or {}).get("nodeName") in in_use)
                rows.append({"step": step, "strategy": name, "pods": count, "share": round(strategies[name](step), 3),
                             "nodeclaims": len(mine), "cost_per_hour": round(cost, 4),
                             "cost_in_use_per_hour": round(cost_in_use, 4), "bound_s": round(bound_s, 1),
                             "on_demand_pods": placed.get((name, "on-demand"), 0), "spot_pods": placed.get((name, "spot"), 0)})
            print(rows[-3:], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="conversation")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--settle", type=float, default=60.0, help="seconds per step at most, for the pods to be bound")
    parser.add_argument("--hold", type=float, default=0.0,
                        help="seconds each step lasts before its NodeClaims are priced (0: as soon as the pods are bound); "
                             f"longer than the pools' consolidateAfter ({capacity.CONSOLIDATE_AFTER}) lets Karpenter remove emptied nodes")
    parser.add_argument("--name", default="capacity_cost", help="results/NAME.{json,md}")
    args = parser.parse_args()
    sim_costs, pods, shares = simulate(args.workload, args.steps)
    rows = measure_karpenter(pods, shares, args.settle, args.hold)
    karpenter = {name: float(np.mean([r["cost_per_hour"] for r in rows if r["strategy"] == name]))
                 for name in ("on-demand-only", "fixed-share", "policy-share")}
    in_use = {name: float(np.mean([r["cost_in_use_per_hour"] for r in rows if r["strategy"] == name]))
              for name in ("on-demand-only", "fixed-share", "policy-share")}
    below_base = sum(1 for r in rows if r["strategy"] != "on-demand-only" and r["pods"] >= ON_DEMAND_BASE
                     and r["on_demand_pods"] < ON_DEMAND_BASE)
    result = {"workload": args.workload, "steps": args.steps, "hold_s": args.hold, "pods": pods, "policy_shares": shares,
              "command": "flock /tmp/agentkube-node.lock .venv/bin/python bench/capacity_cost.py " + " ".join(sys.argv[1:]),
              "simulator_cost_per_hour": sim_costs, "karpenter_cost_per_hour": karpenter,
              "karpenter_cost_in_use_per_hour": in_use,
              "steps_below_on_demand_base": below_base, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    base_k, base_u, base_s = karpenter["on-demand-only"], in_use["on-demand-only"], sim_costs["on-demand only"]
    held = f", each held {args.hold:g} s" if args.hold else ", each priced once its pods were bound"
    lines = [f"# Capacity cost per hour: {args.workload} day in {args.steps} steps{held}", "",
             "| strategy | Karpenter $/h (all NodeClaims) | vs on-demand only | Karpenter $/h (nodes with pods) | "
             "vs on-demand only | simulator $/h | vs on-demand only |", "|---|--:|--:|--:|--:|--:|--:|"]
    for (k_name, s_name) in (("on-demand-only", "on-demand only"), ("fixed-share", f"fixed share {FIXED_SHARE}"),
                             ("policy-share", "policy share")):
        lines.append(f"| {k_name} | {karpenter[k_name]:.3f} | {karpenter[k_name] / base_k - 1:+.1%} | "
                     f"{in_use[k_name]:.3f} | {in_use[k_name] / base_u - 1:+.1%} | "
                     f"{sim_costs[s_name]:.3f} | {sim_costs[s_name] / base_s - 1:+.1%} |")
    lines += ["", f"Steps where a spot strategy ran fewer on-demand pods than the base ({ON_DEMAND_BASE}): {below_base}.",
              f"Policy share per step: {', '.join(f'{s:.2f}' for s in shares)}; pods per step: {pods}.",
              "All NodeClaims: what Karpenter had launched once the step's pods were bound (emptied nodes are "
              "consolidated after a minute, so a step after a scale-down still pays for some); nodes with pods: "
              "only the NodeClaims whose node had one of the strategy's pods bound.",
              "", f"Command: `{result['command']}`"]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
