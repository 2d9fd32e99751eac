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
import report
import requests
from kubernetes.client import ApiException, CoreV1Api, CustomObjectsApi

from agentkube.devenv import DevEnv, images, knative
from agentkube.devenv.versions import default_state_dir
from agentkube.operator import api, servedmodel
from agentkube.rl.calibration import RunRecord, compare, kpa_replay, simulated_run, summarize
from agentkube.rl.episodes import run_episode
from agentkube.rl.knative import KnativeDefaults
from agentkube.rl.policy import load_policy
from agentkube.rl.simulator import BINDINGS, SimConfig, Simulator
from agentkube.rl.traces import Trace, evaluation_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness import Operator, install_operator, kubectl_runner  # noqa: E402  (the operator as the tests run it)

SIM_SEEDS = 10  # the simulator's own spread (its cold starts are random) beside the one real run
NAME = "llm"
MODEL_PORT = 8080
SERVING = ("serving.knative.dev", "v1")
PA = (servedmodel.PA_GROUP, servedmodel.PA_VERSION)


def the_slice(workload: str, index: int, start_minute: float, minutes: float, keep: float, seed: int) -> Trace:
    return evaluation_trace(workload, index).window(start_minute * 60.0, minutes * 60.0).thinned(keep, seed)


def sim_config(max_scale: int, binding: str = "pooled") -> SimConfig:
    """The simulator's settings for the real runs: Knative's defaults (the cluster's config-autoscaler is
    left as shipped) with the ServedModel's max scale, the server model's defaults (the model server's
    too), the cold start as the simulator models it (the model server waits `model_load_s` before it
    listens)."""
    return SimConfig(knative=KnativeDefaults(max_scale=max_scale), binding=binding)


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
        self.load_average: list[float] = []  # the machine's 1-minute load: the emulated server needs spare CPU
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
                    if (self.pods.get(pod.metadata.name) or (None, None))[1] is not None:
                        continue  # its first ready time is kept: a pod being deleted turns not ready
                    ready_at = next((c.last_transition_time for c in pod.status.conditions or []
                                     if c.type == "Ready" and c.status == "True"), None)
                    self.pods[pod.metadata.name] = (pod.metadata.creation_timestamp, ready_at)
            self.load_average.append(float(Path("/proc/loadavg").read_text().split()[0]))
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
             "last_decision": (final.get("status") or {}).get("lastDecision"),
             "load_average": {"mean": float(np.mean(sampler.load_average)), "max": float(np.max(sampler.load_average))},
             "latency_s": [None if math.isnan(x) else round(float(x), 3) for x in latency],
             "kpa": _kpa_series(env.prometheus_url, namespace, start, seconds)}
    return record, extra


# The real autoscaler's own account of each decision (OpenTelemetry-era names), for `calibration.kpa_replay`.
KPA_SERIES = {"ready": "kn_revision_pods_count", "wanted": "kn_revision_pods_desired",
              "stable": "kn_revision_concurrency_stable", "panic": "kn_revision_concurrency_panic",
              "effective_target": "kn_revision_concurrency_target"}


def _kpa_series(prometheus: str, namespace: str, start: float, seconds: int) -> dict[str, list[float | None]]:
    series: dict[str, list[float | None]] = {}
    for key, name in KPA_SERIES.items():
        answer = requests.get(f"{prometheus}/api/v1/query_range", timeout=30, params={
            "query": f'max({name}{{k8s_namespace_name="{namespace}"}})', "start": start, "end": start + seconds - 1,
            "step": "1s"}).json()["data"]["result"]
        values: list[float | None] = [None] * seconds
        for at, value in answer[0]["values"] if answer else []:
            values[min(int(round(float(at) - start)), seconds - 1)] = float(value)
        series[key] = values
    return series


def kpa_agreement(kpa: dict[str, list[float | None]], config: SimConfig) -> dict[str, float]:
    """How often the model's decision, fed the real autoscaler's inputs, wants what the real one wanted."""
    present = [t for t in range(len(kpa["wanted"])) if all(kpa[key][t] is not None for key in KPA_SERIES)]
    if not present:
        return {"seconds": 0.0, "agreeing": math.nan}
    columns = {key: np.asarray([kpa[key][t] for t in present], dtype=float) for key in KPA_SERIES}
    wanted = kpa_replay(config.knative, columns["ready"], columns["stable"], columns["panic"], columns["effective_target"])
    return {"seconds": float(len(present)), "agreeing": float(np.mean(wanted == columns["wanted"])),
            "largest_difference_pods": float(np.abs(wanted - columns["wanted"]).max())}


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
        agreement = runs.get("kpa_model_agreement") or {}
        if agreement.get("seconds"):
            lines += ["", f"The KPA model (`rl/knative.py`) fed the real autoscaler's own inputs (ready pods, stable and "
                          f"panic concurrency, target) wants the real autoscaler's pod count in "
                          f"{agreement['agreeing']:.1%} of {agreement['seconds']:.0f} seconds (largest difference "
                          f"{agreement['largest_difference_pods']:.0f} pods)."]
        bound = runs.get("comparison_pod")
        if bound:
            lines += ["", "With requests bound to their pod (`SimConfig(binding=\"pod\")`): " + ", ".join(
                f"{key} {_fmt(bound['simulator'][key])} (× {_fmt(bound['simulator_over_real'][key])} of real)"
                for key in ("mean_ready_pods", "pod_seconds", "p95_latency_s", "slo_attainment"))
                + f"; ready pods mean |real − simulator| {bound['gaps']['ready_pods_mean_abs_diff']:.2f}."]
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
        sim_kpa, sim_ppo = (result["policies"][p]["comparison"]["simulator"] for p in ("kpa", "ppo"))
        lines += ["", f"PPO's cost against the default on real Knative: {ppo['pod_seconds'] / kpa['pod_seconds'] - 1:+.1%}; "
                      f"in the simulator on the same slice: {sim_ppo['pod_seconds'] / sim_kpa['pod_seconds'] - 1:+.1%} "
                      f"(SLO {sim_ppo['slo_attainment']:.2%} against {sim_kpa['slo_attainment']:.2%})."]
        loads = {p: result["policies"][p]["real_extra"].get("load_average") for p in ("kpa", "ppo")}
        if all(loads.values()):
            lines += ["", "Machine load average during the real runs (the emulated server needs spare CPU; compare "
                          "only runs at similar load): " + ", ".join(
                              f"{p} mean {load['mean']:.1f}, max {load['max']:.1f}" for p, load in loads.items())]
        lines += [""]
    report.save("knative_vs_simulator", result, "\n".join(lines) + "\n", out)
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
        if "sim_ready_pod" in series:
            axis.step(minutes, series["sim_ready_pod"], where="post", label="simulator, requests bound to pods: ready", lw=1.0)
        axis.set_ylabel(f"{policy}: pods")
        axis.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlabel("minutes into the slice")
    fig.suptitle(result["slice"]["description"], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "knative_vs_simulator.png", dpi=90)
    plt.close(fig)


def simulator_side(policy: str, real: RunRecord, extra: dict, trace: Trace, args,
                   real_figures: dict[str, float] | None = None) -> dict:
    """The simulator on the real run's slice and start, under each binding (`SimConfig.binding`), beside
    the real run's figures; and the KPA model against the real autoscaler's own decisions."""
    side: dict = {"real_extra": extra, "real_pod_start_s": real.pod_start_s.tolist(),
                  "series": {"real_ready": real.ready.tolist(), "real_pods": real.pods.tolist(),
                             "real_desired": real.desired.tolist()}}
    for binding in BINDINGS:
        config = sim_config(args.max_scale, binding)
        simulated = simulate(policy, trace, config, int(extra["initial_ready_pods"]), args.seed)
        spread = [summarize(simulate(policy, trace, config, int(extra["initial_ready_pods"]), seed), config.slo)
                  for seed in range(SIM_SEEDS)]
        key = "" if binding == "pooled" else f"_{binding}"
        side[f"comparison{key}"] = compare(real, simulated, config.slo, real_figures)
        side[f"simulator_seeds{key}"] = {name: [run[name] for run in spread] for name in spread[0]}
        side["series"][f"sim_ready{key}"] = simulated.ready.tolist()
        side["series"][f"sim_pods{key}"] = simulated.pods.tolist()
    if extra.get("kpa"):
        side["kpa_model_agreement"] = kpa_agreement(extra["kpa"], sim_config(args.max_scale))
    return side


def from_saved(path: Path, out: Path) -> None:
    """The simulator's side again for a saved run (after a change to the simulator): the real side as it
    was measured (its per-request latencies when saved, else its figures as summarised then)."""
    result = json.loads(path.read_text())
    args = argparse.Namespace(**result["slice"])
    trace = the_slice(args.workload, args.index, args.start_minute, args.minutes, args.keep, args.seed)
    for policy, saved in result["policies"].items():
        series, extra = saved["series"], saved["real_extra"]
        latency = np.asarray([math.nan if x is None else x for x in extra.get("latency_s") or []], dtype=float)
        real = RunRecord(ready=np.asarray(series["real_ready"]), pods=np.asarray(series["real_pods"]),
                         desired=np.asarray(series["real_desired"]),
                         latency_s=latency if latency.size else np.full(len(trace), math.nan),
                         response_tokens=trace.response_tokens, pod_start_s=np.asarray(saved["real_pod_start_s"]))
        figures = None if latency.size else saved["comparison"]["real"]
        if figures is not None:
            figures = {**figures, **{k: v for k, v in summarize(real, sim_config(args.max_scale).slo).items()
                                     if k in ("cold_starts", "pod_seconds", "ready_pod_seconds", "mean_ready_pods",
                                              "max_ready_pods", "scale_ups", "scale_up_lag_median_s",
                                              "scale_up_lag_max_s", "scale_ups_unmet_at_end")}}
        result["policies"][policy] = simulator_side(policy, real, extra, trace, args, figures)
    write_report(result, out)


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
    parser.add_argument("--out", type=Path, default=report.RESULTS)
    parser.add_argument("--from-json", type=Path, help="no real run: the simulator's side again for a saved result")
    args = parser.parse_args()
    if args.from_json:
        from_saved(args.from_json, args.out)
        print((args.out / "knative_vs_simulator.md").read_text())
        return
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
                result["policies"][policy] = simulator_side(policy, real, extra, trace, args)
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
