"""The simulator against real Knative, and Knative's default against the PPO policy on real Knative.

One trace slice (a slice of an evaluation day from `agentkube.rl.traces`, thinned to a rate two shared
cores can serve: `Trace.thinned` keeps every time scale of the trace) is replayed, open loop, through
real Knative Serving on the local node (`DevEnv(with_knative=True)`: the KPA, activator, queue-proxy and
Traefik as KIngress, the emulated model server of `agentkube.modelserver`) once per policy, each run a
ServedModel the operator turns into a Knative Service; then the same slice runs through the simulator
with the same server model, Knative settings and starting pods. Both sides are reduced to the same
figures by `agentkube.rl.calibration` (ready pods over time, p95 latency, cold starts, scale-up lag,
pod-seconds, SLO attainment).

The load generator is bounded: at most `--max-in-flight` requests outstanding (a request that would pass
that is not sent and counts as not answered), each with a timeout, and it stops at the slice's end plus
a drain of at most `--drain` seconds. It sends to Traefik's Service address with the Route's host, on
this machine only.

Writes bench/results/knative_vs_simulator.{json,md}. Holds the node for about (minutes + 3) per policy:

    flock /tmp/agentkube-node.lock .venv/bin/python bench/knative_vs_simulator.py [--minutes 10] [--policies kpa,ppo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import kubernetes
import numpy as np
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from agentkube.devenv import DevEnv, images, knative
from agentkube.devenv.versions import default_state_dir
from agentkube.operator import api, servedmodel
from agentkube.rl.calibration import RunRecord, compare, simulated_run, summarize
from agentkube.rl.episodes import run_episode
from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.policy import load_policy
from agentkube.rl.simulator import SimConfig, Simulator
from agentkube.rl.traces import Trace, evaluation_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Operator, install_operator, kubectl_runner  # noqa: E402  (the operator as the tests run it)

RESULTS = Path(__file__).parent / "results"
SIM_SEEDS = 10  # the simulator's own spread (its cold starts are random) beside the one real run
NAME = "llm"
MODEL_PORT = 8080
SERVING = ("serving.knative.dev", "v1")
PA = (servedmodel.PA_GROUP, servedmodel.PA_VERSION)


def the_slice(workload: str, index: int, start_minute: float, minutes: float, keep: float, seed: int) -> Trace:
    return evaluation_trace(workload, index).window(start_minute * 60.0, minutes * 60.0).thinned(keep, seed)


def sim_config(max_scale: int) -> SimConfig:
    """The simulator's settings for the real runs: Knative's defaults (the cluster's config-autoscaler is
    left as shipped) with the ServedModel's max scale, the server model's defaults (the model server's
    too), the cold start as the simulator models it (the model server waits `model_load_s` before it
    listens)."""
    return SimConfig(knative=KnativeDefaults(max_scale=max_scale))


# ---------------------------------------------------------------------------------------------- real run
def _served_model(policy: str, max_scale: int, model_load_s: float) -> dict:
    return {"apiVersion": api.API_VERSION, "kind": "ServedModel", "metadata": {"name": NAME},
            "spec": {"model": {"name": "emulated"}, "image": images.MODEL_SERVER_IMAGE, "port": MODEL_PORT,
                     "env": [{"name": "MODEL_LOAD_S", "value": f"{model_load_s:g}"}],
                     "autoscaling": {"policy": policy, "minScale": 0, "maxScale": max_scale}}}


def _until(condition, what: str, timeout: float = 300.0, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f}s")


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


class Sampler(threading.Thread):
    """Every second: the revision's ready pods, its pods not being deleted, and the PodAutoscaler's wanted
    count; and, for every pod seen, when it was created and when it became ready."""

    def __init__(self, client, namespace: str) -> None:
        super().__init__(daemon=True)
        self.core, self.custom, self.namespace = CoreV1Api(client), CustomObjectsApi(client), namespace
        self.samples: list[tuple[float, int, int, int]] = []
        self.pods: dict[str, tuple[datetime, datetime | None]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                pods = self.core.list_namespaced_pod(self.namespace, label_selector="serving.knative.dev/service").items
                pas = self.custom.list_namespaced_custom_object(*PA, self.namespace, servedmodel.PA_PLURAL)["items"]
            except (ApiException, OSError):
                pods, pas = None, None
            if pods is not None:
                live = [pod for pod in pods if not pod.metadata.deletion_timestamp]
                desired = sum(int((pa.get("status") or {}).get("desiredScale") or 0) for pa in pas or [])
                self.samples.append((time.time(), sum(map(_ready, live)), len(live), desired))
                for pod in pods:
                    ready_at = next((c.last_transition_time for c in pod.status.conditions or []
                                     if c.type == "Ready" and c.status == "True"), None)
                    self.pods[pod.metadata.name] = (pod.metadata.creation_timestamp, ready_at)
            next_at += 1.0
            self.stop.wait(max(0.0, next_at - time.monotonic()))


async def replay(trace: Trace, ingress: str, host: str, max_in_flight: int, drain_s: float,
                 request_timeout_s: float) -> tuple[np.ndarray, float, dict[str, int]]:
    """Send each request of `trace` at its arrival time (open loop); returns each request's latency in
    trace order (NaN: not answered), the wall-clock start and counts of what went wrong."""
    latency = np.full(len(trace), np.nan)
    problems = {"not_sent_over_bound": 0, "errors": 0, "timeouts": 0, "non_200": 0}
    in_flight = 0
    connector = aiohttp.TCPConnector(limit=max_in_flight, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.time()
        loop_start = time.monotonic()

        async def one(k: int) -> None:
            nonlocal in_flight
            body = {"prompt": "w " * int(trace.request_tokens[k]), "max_tokens": int(trace.response_tokens[k])}
            sent = time.monotonic()
            try:
                async with session.post(f"http://{ingress}/v1/completions", json=body, headers={"Host": host}) as answer:
                    await answer.read()
                    if answer.status == 200:
                        latency[k] = time.monotonic() - sent
                    else:
                        problems["non_200"] += 1
            except TimeoutError:
                problems["timeouts"] += 1
            except aiohttp.ClientError:
                problems["errors"] += 1
            finally:
                in_flight -= 1

        tasks = []
        for k, arrival in enumerate(trace.arrival_s):
            delay = loop_start + float(arrival) - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if in_flight >= max_in_flight:
                problems["not_sent_over_bound"] += 1
                continue
            in_flight += 1
            tasks.append(asyncio.create_task(one(k)))
        remaining = max(0.0, loop_start + trace.duration_s + drain_s - time.monotonic())
        done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return latency, start, problems


def real_run(env: DevEnv, kubectl, policy: str, trace: Trace, args, config: SimConfig) -> tuple[RunRecord, dict]:
    client = kubernetes.config.new_client_from_config(config_file=str(env.kubeconfig))
    custom, core = CustomObjectsApi(client), CoreV1Api(client)
    namespace = f"calib-{policy}"
    kubectl("create", "namespace", namespace, check=False)
    custom.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels",
                                           _served_model(policy, args.max_scale, config.cold_start.model_load_s))
    model = _until(lambda: (m := custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels",
                                                                      NAME)).get("status", {}).get("ready") and m,
                   f"ServedModel {namespace}/{NAME} Ready")
    service = core.read_namespaced_service(knative.TRAEFIK_SERVICE, knative.SYSTEM_NAMESPACE)
    ingress = f"{service.spec.cluster_ip}:{knative.TRAEFIK_HTTP_PORT}"
    sampler = Sampler(client, namespace)
    sampler.start()
    _until(lambda: sampler.samples and sampler.samples[-1][1] >= 1, "a ready revision pod", timeout=120)
    initial_ready = sampler.samples[-1][1]
    latency, start, problems = asyncio.run(replay(trace, ingress, model["status"]["url"].removeprefix("http://"),
                                                  args.max_in_flight, args.drain, args.request_timeout))
    sampler.stop.set()
    sampler.join()
    seconds = int(math.ceil(trace.duration_s))
    series = np.zeros((seconds, 3))
    samples = np.asarray(sampler.samples)
    for t in range(seconds):  # the last sample at or before each second of the slice
        at = np.searchsorted(samples[:, 0], start + t, side="right") - 1
        series[t] = samples[max(at, 0), 1:]
    starts = [(ready - created).total_seconds() for created, ready in sampler.pods.values()
              if ready is not None and created.timestamp() >= start - 1.0]
    revisions = len(custom.list_namespaced_custom_object(*SERVING, namespace, "revisions")["items"])
    final = custom.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", NAME)
    custom.delete_namespaced_custom_object(api.GROUP, api.VERSION, namespace, "servedmodels", NAME)
    _until(lambda: not core.list_namespaced_pod(namespace).items, f"{namespace}'s pods gone", timeout=180)
    record = RunRecord(ready=series[:, 0], pods=series[:, 1], desired=series[:, 2], latency_s=latency,
                       response_tokens=trace.response_tokens, pod_start_s=np.asarray(starts))
    extra = {"initial_ready_pods": initial_ready, "revisions": revisions, "problems": problems,
             "last_decision": (final.get("status") or {}).get("lastDecision")}
    return record, extra


# ---------------------------------------------------------------------------------------------- simulator
def simulate(policy: str, trace: Trace, config: SimConfig, ready_pods: int, seed: int) -> RunRecord:
    if policy == "ppo":
        _, sim, _ = run_episode(load_policy(), trace, config, seed=seed, ready_pods=ready_pods)
    else:
        sim = Simulator(config)
        sim.reset(trace, seed=seed, ready_pods=ready_pods)
        sim.advance(int(math.ceil(trace.duration_s)))
    return simulated_run(sim)


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: float) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


FIGURES = ("mean_ready_pods", "max_ready_pods", "pod_seconds", "p50_latency_s", "p95_latency_s", "slo_attainment",
           "answered_share", "cold_starts", "pod_start_median_s", "pod_start_max_s", "scale_ups",
           "scale_up_lag_median_s", "scale_up_lag_max_s")


def write_report(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "knative_vs_simulator.json").write_text(json.dumps(result, indent=1, default=float))
    lines = [f"# Simulator against real Knative ({result['slice']['description']})", "",
             f"`{result['command']}`", ""]
    for policy, runs in result["policies"].items():
        comparison = runs["comparison"]
        seeds = runs["simulator_seeds"]
        lines += [f"## policy `{policy}`", "", f"| figure | real Knative | simulator (seed {result['slice']['seed']}) | "
                  f"simulator / real | simulator, {len(seeds['seconds'])} seeds: min–max |", "|---|--:|--:|--:|--:|"]
        for key in FIGURES:
            values = np.asarray(seeds[key], dtype=float)
            values = values[~np.isnan(values)]
            spread = f"{_fmt(float(values.min()))}–{_fmt(float(values.max()))}" if values.size else "—"
            lines.append(f"| {key} | {_fmt(comparison['real'][key])} | {_fmt(comparison['simulator'][key])} | "
                         f"{_fmt(comparison['simulator_over_real'][key])} | {spread} |")
        gaps = comparison["gaps"]
        lines += ["", f"Ready pods, mean |real − simulator|: {gaps['ready_pods_mean_abs_diff']:.2f} per second, "
                      f"{gaps['ready_pods_minute_mean_abs_diff']:.2f} on minute means. Real run: "
                      f"{runs['real_extra']['revisions']} revision(s), problems {runs['real_extra']['problems']}.", ""]
        lines += ["Ready pods per 30 s (real / simulator): " + ", ".join(
            f"{int(r)}/{int(s)}" for r, s in zip(runs["series"]["real_ready"][::30], runs["series"]["sim_ready"][::30],
                                                  strict=False)), ""]
    if {"kpa", "ppo"} <= set(result["policies"]):
        lines += ["## Knative's default against PPO on real Knative (same slice)", "",
                  "| policy | pod-seconds | SLO attainment | p95 latency s | mean ready pods |", "|---|--:|--:|--:|--:|"]
        for policy in ("kpa", "ppo"):
            real = result["policies"][policy]["comparison"]["real"]
            lines.append(f"| {policy} | {real['pod_seconds']:.0f} | {real['slo_attainment']:.2%} | "
                         f"{_fmt(real['p95_latency_s'])} | {real['mean_ready_pods']:.2f} |")
        kpa, ppo = (result["policies"][p]["comparison"]["real"] for p in ("kpa", "ppo"))
        lines += ["", f"PPO's cost against the default: {ppo['pod_seconds'] / kpa['pod_seconds'] - 1:+.1%}.", ""]
    (out / "knative_vs_simulator.md").write_text("\n".join(lines) + "\n")
    _plot(result, out)


def _plot(result: dict, out: Path) -> None:
    """Ready pods over time, real against simulated, one panel per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = result["policies"]
    fig, axes = plt.subplots(len(policies), 1, figsize=(10, 3.2 * len(policies)), sharex=True, squeeze=False)
    for axis, (policy, runs) in zip(axes[:, 0], policies.items(), strict=True):
        series = runs["series"]
        minutes = np.arange(len(series["real_ready"])) / 60.0
        axis.step(minutes, series["real_ready"], where="post", label="real Knative: ready", lw=1.2)
        axis.step(minutes, series["real_desired"], where="post", label="real: KPA wants", lw=0.8, ls="--")
        axis.step(minutes, series["sim_ready"], where="post", label="simulator: ready", lw=1.2)
        axis.step(minutes, series["sim_pods"], where="post", label="simulator: wants", lw=0.8, ls="--")
        axis.set_ylabel(f"{policy}: pods")
        axis.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("minutes into the slice")
    fig.suptitle(result["slice"]["description"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "knative_vs_simulator.png", dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="flash")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--start-minute", type=float, default=249.0, help="where the slice starts in the day")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--keep", type=float, default=0.2, help="share of the trace's requests replayed")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--max-scale", type=int, default=10)
    parser.add_argument("--max-in-flight", type=int, default=1000)
    parser.add_argument("--drain", type=float, default=180.0)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--policies", default="kpa,ppo")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    trace = the_slice(args.workload, args.index, args.start_minute, args.minutes, args.keep, args.seed)
    config = sim_config(args.max_scale)
    description = (f"{args.workload}-eval-{args.index}, minutes {args.start_minute:g}–{args.start_minute + args.minutes:g}, "
                   f"{args.keep:.0%} of its requests: {len(trace)} requests, {len(trace) / trace.duration_s:.1f}/s mean")
    result: dict = {"slice": {"description": description, **vars(args) | {"out": str(args.out)}},
                    "command": "flock /tmp/agentkube-node.lock .venv/bin/python bench/knative_vs_simulator.py "
                               + " ".join(sys.argv[1:]), "policies": {}}
    # No node agent: nothing here runs sandboxes, and its eBPF programs would only take CPU from the run.
    env = DevEnv(default_state_dir(), tie_to_parent=True, with_knative=True, node_agent="none")
    started = time.monotonic()
    env.up()
    print(f"environment up in {time.monotonic() - started:.0f}s", flush=True)
    try:
        kubectl = kubectl_runner(env)
        log_dir = Path("/tmp/knative-vs-simulator-logs")
        log_dir.mkdir(exist_ok=True)
        operator = Operator(install_operator(env, kubectl), log_dir, "--peering=",
                            f"--prometheus-url={env.prometheus_url}")
        operator.start()
        try:
            for policy in args.policies.split(","):
                print(f"{policy}: replaying {description}", flush=True)
                real, extra = real_run(env, kubectl, policy, trace, args, config)
                simulated = simulate(policy, trace, config, int(extra["initial_ready_pods"]), args.seed)
                spread = [summarize(simulate(policy, trace, config, int(extra["initial_ready_pods"]), seed), config.slo)
                          for seed in range(SIM_SEEDS)]
                result["policies"][policy] = {
                    "comparison": compare(real, simulated, config.slo), "real_extra": extra,
                    "simulator_seeds": {key: [run[key] for run in spread] for key in spread[0]},
                    "series": {"real_ready": real.ready.tolist(), "real_pods": real.pods.tolist(),
                               "real_desired": real.desired.tolist(), "sim_ready": simulated.ready.tolist(),
                               "sim_pods": simulated.pods.tolist()},
                    "real_pod_start_s": real.pod_start_s.tolist(),
                }
                print(json.dumps(summarize(real, config.slo)), flush=True)
                write_report(result, args.out)
        finally:
            operator.stop()
    finally:
        env.down()
    write_report(result, args.out)
    print((args.out / "knative_vs_simulator.md").read_text())


if __name__ == "__main__":
    main()
