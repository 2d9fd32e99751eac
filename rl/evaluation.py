"""Evaluate PPO against the baselines on held-out traces; write JSON, a Markdown table and plots.

Baselines that need tuning (the static target, the target-tracking set point, Q-learning) are tuned
per workload on that workload's training traces, then run with PPO on the same evaluation traces,
simulator seeds and decision interval.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agentkube.rl.baselines import (
    KnativeDefault,
    QLearning,
    StaticTarget,
    TargetTracking,
    grid_search_static_target,
    tune_target_tracking,
)
from agentkube.rl.episodes import Policy, run_episode
from agentkube.rl.policy import ExportedPolicy
from agentkube.rl.simulator import SimConfig, Simulator
from agentkube.rl.traces import WORKLOADS, evaluation_trace, training_trace

__all__ = ["EvaluationConfig", "evaluate", "write_report", "GOALS"]

FIXED_SPOT_SHARE = 0.7
GOALS = {"ppo_saving_vs_default": 0.25, "slo": 0.99, "spot_saving_vs_on_demand": 0.50, "served_through_interruptions": 0.999}


@dataclass(frozen=True)
class EvaluationConfig:
    workloads: tuple[str, ...] = tuple(sorted(WORKLOADS))
    eval_days: float = 1.0
    tuning_days: float = 1.0
    q_learning_epochs: int = 3
    seed: int = 0
    sim: SimConfig = field(default_factory=SimConfig)


def _row(policy: str, scenario: str, trace: str, summary, extra: dict | None = None) -> dict:
    return {"policy": policy, "scenario": scenario, "trace": trace, **summary.as_dict(), **(extra or {})}


def evaluate(
    ppo: ExportedPolicy, config: EvaluationConfig = EvaluationConfig(), log: Callable[[str], None] = lambda _: None,
) -> tuple[list[dict], dict[str, dict[str, Simulator]]]:
    """Run every policy on every evaluation trace; returns result rows and, per trace, the simulators
    (with their per-second series) of the policies that are plotted."""
    rows: list[dict] = []
    runs: dict[str, dict[str, Simulator]] = {}
    for workload in config.workloads:
        started = time.perf_counter()
        tuning = [training_trace(workload, 0, config.tuning_days * 86_400)]
        best_target = grid_search_static_target(tuning, config.sim, seed=config.seed)
        setpoint = tune_target_tracking(tuning, config.sim, seed=config.seed)
        q_learning = QLearning(seed=config.seed).train(tuning, config.sim, epochs=config.q_learning_epochs, seed=config.seed)
        trace = evaluation_trace(workload, 0, config.eval_days * 86_400)
        log(f"{workload}: tuned in {time.perf_counter() - started:.0f} s (static target {best_target:g}, "
            f"latency set point {setpoint:g})")
        on_demand: dict[str, Policy] = {
            "knative-default": KnativeDefault(),
            f"static-best ({best_target:g})": StaticTarget(best_target),
            "q-learning": q_learning,
            f"target-tracking ({setpoint:g})": TargetTracking(setpoint),
            "ppo": ppo,
        }
        spot: dict[str, Policy] = {
            f"on-demand-only ({best_target:g})": StaticTarget(best_target, 0.0),
            f"fixed-spot-{FIXED_SPOT_SHARE:g} ({best_target:g})": StaticTarget(best_target, FIXED_SPOT_SHARE),
            "ppo+spot": ppo,
        }
        runs[trace.name] = {}
        for scenario, policies, spot_allowed in (("on-demand", on_demand, False), ("spot", spot, True)):
            for name, policy in policies.items():
                initial = getattr(policy, "target", None) if isinstance(policy, StaticTarget) else None
                summary, sim, total_reward = run_episode(policy, trace, config.sim, seed=config.seed,
                                                         spot_allowed=spot_allowed, initial_target=initial)
                rows.append(_row(name, scenario, trace.name, summary, {"reward": total_reward,
                                 "mean_target": float(sim.target_series.mean() / config.sim.knative.target_utilization)}))
                if name in ("knative-default", "ppo", "ppo+spot") or name.startswith("static-best"):
                    runs[trace.name][name] = sim
    return rows, runs


def _goals(rows: list[dict]) -> list[str]:
    lines = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        by = {r["policy"]: r for r in rows if r["trace"] == trace}
        default, ppo, spot_ppo = by["knative-default"], by["ppo"], by["ppo+spot"]
        static = next(r for name, r in by.items() if name.startswith("static-best"))
        rule = next(r for name, r in by.items() if name.startswith("target-tracking"))
        on_demand = next(r for name, r in by.items() if name.startswith("on-demand-only"))
        saving = 1 - ppo["cost"] / default["cost"]
        spot_saving = 1 - spot_ppo["cost"] / on_demand["cost"]

        def mark(ok: bool) -> str:
            return "met" if ok else "**missed**"

        within_slo = ppo["slo_attainment"] >= GOALS["slo"]
        saving_met = saving >= GOALS["ppo_saving_vs_default"] and within_slo
        no_worse = ppo["cost"] <= static["cost"] and ppo["cost"] <= rule["cost"] and within_slo
        spot_met = (spot_saving >= GOALS["spot_saving_vs_on_demand"]
                    and spot_ppo["served_share"] >= GOALS["served_through_interruptions"])
        lines += [
            f"- `{trace}`: PPO costs {-saving:+.1%} against Knative's default at {ppo['slo_attainment']:.2%} within "
            f"SLO (goal ≥ 25% at ≥ 99%: {mark(saving_met)}); "
            f"cost vs best static {ppo['cost'] / static['cost'] - 1:+.1%}, vs tuned rule {ppo['cost'] / rule['cost'] - 1:+.1%} "
            f"(goal: no worse: {mark(no_worse)}); "
            f"with spot {-spot_saving:+.1%} against on-demand only, {spot_ppo['served_share']:.3%} served "
            f"(goal ≥ 50% at ≥ 99.9%: {mark(spot_met)})."
        ]
    return lines


def write_report(rows: list[dict], runs: dict[str, dict[str, Simulator]], out_dir: str | Path, header: str = "") -> Path:
    """`rl_evaluation.json`, `rl_evaluation.md` and one `rl_evaluation_<trace>.png` per trace."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rl_evaluation.json").write_text(json.dumps(rows, indent=1, default=float) + "\n")
    lines = ["# RL autoscaling: evaluation on held-out traces", "", header, "",
             "| trace | scenario | policy | cost ($) | vs default | within SLO | served | p95 latency (s) | cold starts "
             "| failed | mean target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next(r for r in rows if r["trace"] == row["trace"] and r["policy"] == "knative-default")
        lines.append(
            f"| {row['trace']} | {row['scenario']} | {row['policy']} | {row['cost']:.2f} | {row['cost'] / base['cost'] - 1:+.1%} | "
            f"{row['slo_attainment']:.2%} | {row['served_share']:.3%} | {row['p95_latency_s']:.1f} | {row['cold_starts']} | "
            f"{row['failed']:.0f} | {row['mean_target']:.0f} |")
    lines += ["", "## Goals", "", *_goals(rows), ""]
    for trace in runs:
        lines.append(f"![{trace}](rl_evaluation_{trace}.png)")
    (out / "rl_evaluation.md").write_text("\n".join(lines) + "\n")
    _plot(runs, out)
    return out / "rl_evaluation.md"


def _plot(runs: dict[str, dict[str, Simulator]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for trace, sims in runs.items():
        fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True)
        for name, sim in sims.items():
            minutes = np.arange(sim.seconds) / 3600.0
            axes[1].plot(minutes, sim.ready_series, label=name, lw=0.8)
            times, p95s = np.array([(t, p) for t, p in sim.latency_p95_series if not math.isnan(p)]).T
            smooth = np.convolve(p95s, np.ones(10) / 10, mode="same")  # 5-minute running mean: readable
            axes[2].plot(times / 3600.0, smooth, label=name, lw=0.8)
            axes[3].plot(minutes, sim.target_series / sim.config.knative.target_utilization, label=name, lw=0.8)
        any_sim = next(iter(sims.values()))
        rate = np.bincount(any_sim.trace.arrival_s.astype(int) // 60) / 60.0
        axes[0].plot(np.arange(rate.size) / 60.0, rate, color="grey", lw=0.8)
        axes[0].set_ylabel("requests/s")
        axes[1].set_ylabel("ready pods")
        axes[2].set_ylabel("p95 latency (s, 5 min mean)")
        axes[3].set_ylabel("target / pod")
        axes[3].set_xlabel("hours")
        axes[1].legend(fontsize=7, loc="upper right")
        fig.suptitle(trace)
        fig.tight_layout()
        fig.savefig(out / f"rl_evaluation_{trace}.png", dpi=90)
        plt.close(fig)
