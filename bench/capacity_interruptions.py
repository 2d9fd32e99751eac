"""Spot interruptions in a row on real Karpenter (its KWOK provider), real Knative Serving and the
operator: for each, were all of the revision's pods Ready off the interrupted node before the first pod
on it was evicted, and did the floor, the budget and the pod count return to before afterwards?

A ServedModel (policy fixed: 4 replicas; spot on, an on-demand base of 1, at most half on spot) is placed
by the operator's NodePools; then, `--interruptions` times in a row, one of its spot nodes gets the
notice (`agentkube capacity interrupt NODE --notice S`: the spot-itn taint, then its NodeClaim deleted),
and a pod watch records, in the API server's order, what was Ready when the first pod on that node went.
Karpenter's nodes have simulated kubelets (kwok): pods bound there never run, so nothing here measures
requests, only the order of Ready and eviction.

Writes bench/results/capacity_interruptions.{json,md}. Needs the node (hold the lock):

    flock /tmp/agentkube-node.lock .venv/bin/python bench/capacity_interruptions.py --interruptions 20
"""

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import kubernetes

from agentkube import interruption_watch
from agentkube.devenv import DevEnv, images
from agentkube.devenv.versions import default_state_dir
from agentkube.operator import api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from nodeagent_common import write_results  # noqa: E402

from harness import Operator, install_operator, kubectl_runner  # noqa: E402  (the operator as the tests run it)

NAMESPACE = "capacity-interruptions"
MODEL = "llm"
REPLICAS = 4


def served_model() -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": MODEL},
            "spec": {"model": {"name": "emulated"}, "image": images.MODEL_SERVER_IMAGE,
                     "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                     "autoscaling": {"policy": "fixed", "minScale": REPLICAS, "maxScale": REPLICAS, "initialScale": REPLICAS},
                     "capacity": {"spot": {"enabled": True, "onDemandBase": 1, "maxSpotFraction": 0.5}}}}


def run(interruptions: int, notice_s: float) -> tuple[list[interruption_watch.Interruption], float, str | None]:
    """The outcomes, the minutes they took, and why the run stopped early (None: it did not)."""
    # No node agent: nothing here runs sandboxes.
    env = DevEnv(default_state_dir(), tie_to_parent=True, with_knative=True, with_capacity=True, node_agent="none")
    started = time.monotonic()
    env.up()
    print(f"environment up in {time.monotonic() - started:.0f}s", flush=True)
    outcomes, stopped = [], None
    try:
        kubectl = kubectl_runner(env)
        log_dir = Path("/tmp/capacity-interruptions-logs")
        log_dir.mkdir(exist_ok=True)
        operator = Operator(install_operator(env, kubectl), log_dir, "--peering=")
        operator.start()
        try:
            api_client = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))
            kubernetes.client.CoreV1Api(api_client).create_namespace({"metadata": {"name": NAMESPACE}})
            kubernetes.client.CustomObjectsApi(api_client).create_namespaced_custom_object(
                api.GROUP, api.VERSION, NAMESPACE, "servedmodels", served_model())
            began = time.monotonic()
            for index in range(interruptions):
                try:
                    outcome = interruption_watch.play(api_client, env.environ(), NAMESPACE, MODEL, REPLICAS, notice_s)
                except interruption_watch.InterruptionNotPlayed as error:  # not back to steady: what ran so far is the result
                    stopped = f"interruption {index + 1}: {error}"
                    print(stopped, flush=True)
                    break
                outcomes.append(outcome)
                print(index + 1, asdict(outcome), f"replaced before eviction: {outcome.replaced_before_eviction}",
                      flush=True)
            elapsed = time.monotonic() - began
        finally:
            operator.stop()
    finally:
        env.down()
    return outcomes, elapsed, stopped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interruptions", type=int, default=20)
    parser.add_argument("--notice", type=float, default=10.0, help="seconds from the notice to the NodeClaim's deletion")
    args = parser.parse_args()
    outcomes, elapsed, stopped = run(args.interruptions, args.notice)
    if not outcomes:
        raise SystemExit(f"no interruption completed: {stopped}")
    replaced = sum(o.replaced_before_eviction for o in outcomes)
    restored = sum(o.restored_s is not None and o.pods_after == REPLICAS for o in outcomes)
    result = {"command": "flock /tmp/agentkube-node.lock .venv/bin/python bench/capacity_interruptions.py "
                         + " ".join(sys.argv[1:]),
              "interruptions": len(outcomes), "notice_s": args.notice, "replicas": REPLICAS,
              "replaced_before_eviction": replaced, "replacement_before_eviction_rate": replaced / len(outcomes),
              "returned_to_before": restored, "seconds": round(elapsed, 1), "stopped_early": stopped,
              "outcomes": [asdict(o) | {"replaced_before_eviction": o.replaced_before_eviction} for o in outcomes]}
    rows = [[str(i + 1), o.node, f"{o.on_node}/{o.pods_before}",
             "—" if o.ready_elsewhere_at_first_eviction is None else str(o.ready_elsewhere_at_first_eviction),
             "yes" if o.replaced_before_eviction else "**no**", f"{o.node_gone_s:.0f}",
             "—" if o.restored_s is None else f"{o.restored_s:.0f}", str(o.pods_after)] for i, o in enumerate(outcomes)]
    notes = (f"Replacement before eviction: **{replaced} of {len(outcomes)}** "
             f"({replaced / len(outcomes):.0%}); floor, budget and pod count back to before: {restored} of "
             f"{len(outcomes)}. {len(outcomes)} interruptions in {elapsed / 60:.1f} min, notice {args.notice:g} s. "
             "Ready elsewhere: the revision's pods Ready, not being deleted and off the node, in the state the pod "
             "watch held when the first pod on the node was seen going (it must be at least the pods before the "
             f"notice, {REPLICAS}). Nodes are kwok's: pods bound there never run."
             + (f" **Stopped early** ({stopped})." if stopped else "") + "\n\n"
             f"Command: `{result['command']}`")
    write_results("capacity_interruptions", result, f"Spot interruptions in a row on real Karpenter ({len(outcomes)})",
                  ["#", "node", "pods on node / revision", "Ready elsewhere at first eviction", "replaced first",
                   "node gone (s)", "back to before (s)", "pods after"], rows, notes)


if __name__ == "__main__":
    main()
