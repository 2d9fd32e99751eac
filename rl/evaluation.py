"""Evaluate PPO against the baselines on traces it never trained on; write JSON, a Markdown table and plots.

The traces: the three workloads' held-out evaluation days, the held-out families of
`agentkube.rl.workloads` (outside the training ranges, or from other processes), and any BurstGPT CSV
a user gives (`agentkube rl evaluate --trace FILE`). Baselines are tuned the way a user would: the
static target, the target-tracking set point and Q-learning on the training trace of the closest
workload (`workloads.closest_workload`), each the cheapest keeping the user's SLO goal (99% of
requests within it) there; the best static target in hindsight is searched the same way on the
evaluation trace itself, as the reference no deployable policy beats by much. Tuned to "no lower
attainment than Knative's default" instead, every static target search ends at the default's own 100
(any higher target gives up some attainment), so the 99% goal is the bar that makes them rivals. The
report also gives the cheapest static target in hindsight at PPO's own attainment ("matched"): what a
fixed target would have cost for the same SLO, which says whether PPO's changes of target pay. All run with PPO on the
same traces, simulator seeds and decision interval.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agentkube.rl.baselines import (
    STATIC_TARGET_GRID,
    KnativeDefault,
    QLearning,
    StaticTarget,
    TargetTracking,
    cheapest_within_slo,
    grid_search_static_target,
    tune_target_tracking,
)
from agentkube.rl.episodes import Policy, run_episode
from agentkube.rl.policy import ExportedPolicy
from agentkube.rl.simulator import SimConfig, Simulator
from agentkube.rl.traces import WORKLOADS, Trace, evaluation_trace, training_trace
from agentkube.rl.workloads import HELD_OUT_FAMILIES, closest_workload, held_out_trace

__all__ = ["EvaluationConfig", "EvaluationTrace", "default_suite", "evaluate", "write_report", "GOALS"]

FIXED_SPOT_SHARE = 0.7
GOALS = {"ppo_saving_vs_default": 0.25, "slo": 0.99, "spot_saving_vs_on_demand": 0.50, "served_through_interruptions": 0.999,
         "gap_to_hindsight": 0.05}
HINDSIGHT = "static-hindsight"
MATCHED = "static-hindsight-matched"


@dataclass(frozen=True)
class EvaluationConfig:
    eval_days: float = 1.0
    tuning_days: float = 1.0
    q_learning_epochs: int = 3
    seed: int = 0
    sim: SimConfig = field(default_factory=SimConfig)


@dataclass(frozen=True)
class EvaluationTrace:
    """A trace to evaluate on and its family: a training workload's name, a held-out family's, or "user"."""

    trace: Trace
    family: str


def default_suite(days: float = 1.0, workloads: Sequence[str] = tuple(sorted(WORKLOADS)),
                  families: Sequence[str] = tuple(sorted(HELD_OUT_FAMILIES))) -> list[EvaluationTrace]:
    """The workloads' held-out evaluation days, then one day of every held-out family."""
    return ([EvaluationTrace(evaluation_trace(w, 0, days * 86_400), w) for w in workloads]
            + [EvaluationTrace(held_out_trace(f, 0, days * 86_400), f) for f in families])


def _row(policy: str, scenario: str, item: EvaluationTrace, tuned_on: str, summary, extra: dict | None = None) -> dict:
    return {"policy": policy, "scenario": scenario, "trace": item.trace.name, "family": item.family,
            "tuned_on": tuned_on, **summary.as_dict(), **(extra or {})}


@dataclass
class _Tuned:
    static_target: float
    setpoint: float
    q_learning: QLearning


def evaluate(
    ppo: ExportedPolicy, config: EvaluationConfig = EvaluationConfig(), log: Callable[[str], None] = lambda _: None,
    suite: Sequence[EvaluationTrace] | None = None,
) -> tuple[list[dict], dict[str, dict[str, Simulator]]]:
    """Run every policy on every trace of `suite` (default: `default_suite`); returns result rows and,
    per trace, the simulators (with their per-second series) of the policies that are plotted."""
    suite = list(suite) if suite is not None else default_suite(config.eval_days)
    references = {w: training_trace(w, 0, config.tuning_days * 86_400) for w in sorted(WORKLOADS)}
    tuned: dict[str, _Tuned] = {}
    rows: list[dict] = []
    runs: dict[str, dict[str, Simulator]] = {}
    for item in suite:
        trace = item.trace
        workload = item.family if item.family in WORKLOADS else closest_workload(trace, references)
        if workload not in tuned:
            started = time.perf_counter()
            tuning = [references[workload]]
            tuned[workload] = _Tuned(
                grid_search_static_target(tuning, config.sim, seed=config.seed),
                tune_target_tracking(tuning, config.sim, seed=config.seed),
                QLearning(seed=config.seed).train(tuning, config.sim, epochs=config.q_learning_epochs, seed=config.seed))
            log(f"{workload}: tuned in {time.perf_counter() - started:.0f} s (static target "
                f"{tuned[workload].static_target:g}, latency set point {tuned[workload].setpoint:g})")
        best = tuned[workload]
        grid = {c: [run_episode(StaticTarget(c), trace, config.sim, seed=config.seed, initial_target=c)[0]]
                for c in STATIC_TARGET_GRID}
        hindsight = cheapest_within_slo(grid)
        log(f"{trace.name} ({item.family}, tuned on {workload}): hindsight static target {hindsight:g}")
        on_demand: dict[str, Policy] = {
            "knative-default": KnativeDefault(),
            f"static-tuned ({best.static_target:g})": StaticTarget(best.static_target),
            f"{HINDSIGHT} ({hindsight:g})": StaticTarget(hindsight),
            "q-learning": best.q_learning,
            f"target-tracking ({best.setpoint:g})": TargetTracking(best.setpoint),
            "ppo": ppo,
        }
        spot: dict[str, Policy] = {
            f"on-demand-only ({best.static_target:g})": StaticTarget(best.static_target, 0.0),
            f"fixed-spot-{FIXED_SPOT_SHARE:g} ({best.static_target:g})": StaticTarget(best.static_target, FIXED_SPOT_SHARE),
            "ppo+spot": ppo,
        }
        runs[trace.name] = {}
        for scenario, policies, spot_allowed in (("on-demand", on_demand, False), ("spot", spot, True)):
            for name, policy in policies.items():
                initial = getattr(policy, "target", None) if isinstance(policy, StaticTarget) else None
                summary, sim, total_reward = run_episode(policy, trace, config.sim, seed=config.seed,
                                                         spot_allowed=spot_allowed, initial_target=initial)
                rows.append(_row(name, scenario, item, workload, summary, {
                    "reward": total_reward,
                    "mean_target": float(sim.target_series.mean() / config.sim.knative.target_utilization)}))
                if item.family in WORKLOADS and (name in ("knative-default", "ppo", "ppo+spot") or name.startswith("static-tuned")):
                    runs[trace.name][name] = sim
                if name == "ppo":
                    matched = cheapest_within_slo(grid, summary.slo_attainment)
                    matched_summary = grid[matched][0]
                    rows.append(_row(f"{MATCHED} ({matched:g})", "reference", item, workload, matched_summary,
                                     {"reward": None, "mean_target": matched}))
        if not runs[trace.name]:
            del runs[trace.name]
    return rows, runs


def row_named(by: dict[str, dict], prefix: str) -> dict:
    """The row of the first policy whose name starts with `prefix` (a baseline's name carries its setting)."""
    return next(r for name, r in by.items() if name.startswith(prefix))


def verdicts(rows: list[dict]) -> list[dict]:
    """Per trace, PPO against the goal: cost vs the default, the tuned static target, the tuned rule
    and the hindsight static target; SLO attainment vs the default's."""
    out = []
    for trace in dict.fromkeys(r["trace"] for r in rows):
        by = {r["policy"]: r for r in rows if r["trace"] == trace}
        default, ppo = by["knative-default"], by["ppo"]
        static, rule, hindsight = row_named(by, "static-tuned"), row_named(by, "target-tracking"), row_named(by, HINDSIGHT + " ")
        matched = row_named(by, MATCHED)
        verdict = {
            "trace": trace, "family": ppo["family"], "tuned_on": ppo["tuned_on"],
            "cost_vs_default": ppo["cost"] / default["cost"] - 1,
            "cost_vs_static_tuned": ppo["cost"] / static["cost"] - 1,
            "cost_vs_rule_tuned": ppo["cost"] / rule["cost"] - 1,
            "gap_to_hindsight": ppo["cost"] / hindsight["cost"] - 1,
            "gap_to_matched_hindsight": ppo["cost"] / matched["cost"] - 1,
            "slo_ppo": ppo["slo_attainment"], "slo_default": default["slo_attainment"],
            "slo_static_tuned": static["slo_attainment"], "slo_rule_tuned": rule["slo_attainment"],
            "slo_hindsight": hindsight["slo_attainment"],
        }
        verdict["slo_met"] = verdict["slo_ppo"] >= verdict["slo_default"]
        verdict["cheapest_met"] = verdict["cost_vs_static_tuned"] <= 0 and verdict["cost_vs_rule_tuned"] <= 0
        verdict["hindsight_met"] = verdict["gap_to_hindsight"] <= GOALS["gap_to_hindsight"]
        verdict["met"] = verdict["slo_met"] and verdict["cheapest_met"] and verdict["hindsight_met"]
        out.append(verdict)
    return out


def _goals(rows: list[dict]) -> list[str]:
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    lines = ["| trace | family | tuned on | PPO vs default | vs tuned static | vs tuned rule | gap to hindsight "
             "| vs matched hindsight | SLO PPO / default / static / hindsight | goal |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in verdicts(rows):
        why = [w for w, ok in (("SLO", v["slo_met"]), ("cost", v["cheapest_met"]), ("hindsight", v["hindsight_met"])) if not ok]
        lines.append(
            f"| {v['trace']} | {v['family']} | {v['tuned_on']} | {v['cost_vs_default']:+.1%} | {v['cost_vs_static_tuned']:+.1%} "
            f"| {v['cost_vs_rule_tuned']:+.1%} | {v['gap_to_hindsight']:+.1%} | {v['gap_to_matched_hindsight']:+.1%} "
            f"| {v['slo_ppo']:.2%} / {v['slo_default']:.2%} / {v['slo_static_tuned']:.2%} / {v['slo_hindsight']:.2%} "
            f"| {mark(v['met'])}{' (' + ', '.join(why) + ')' if why else ''} |")
    lines += ["", "Goal per trace: no dearer than the tuned static target and the tuned rule, at no lower SLO "
              "attainment than Knative's default, and within 5% of the hindsight static target's cost. Static "
              "targets and the rule are tuned to keep 99% within the SLO (on the closest workload's training day; "
              "the hindsight one on the trace itself); \"matched hindsight\" is the cheapest static target on the "
              "trace at PPO's own attainment.", ""]
    for trace in dict.fromkeys(r["trace"] for r in rows):
        by = {r["policy"]: r for r in rows if r["trace"] == trace}
        spot_ppo, on_demand = by["ppo+spot"], row_named(by, "on-demand-only")
        spot_saving = 1 - spot_ppo["cost"] / on_demand["cost"]
        spot_met = (spot_saving >= GOALS["spot_saving_vs_on_demand"]
                    and spot_ppo["served_share"] >= GOALS["served_through_interruptions"])
        lines.append(f"- `{trace}` with spot: {-spot_saving:+.1%} against on-demand only, {spot_ppo['served_share']:.3%} "
                     f"served (goal ≥ 50% at ≥ 99.9%: {mark(spot_met)}).")
    return lines


def write_report(rows: list[dict], runs: dict[str, dict[str, Simulator]], out_dir: str | Path, header: str = "") -> Path:
    """`rl_evaluation.json`, `rl_evaluation.md` and one `rl_evaluation_<trace>.png` per trace."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"rows": rows, "verdicts": verdicts(rows)}
    (out / "rl_evaluation.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    lines = ["# RL autoscaling: evaluation on traces PPO never trained on", "", header, "", "## Goals", "", *_goals(rows),
             "", "## Every run", "",
             "| trace | scenario | policy | cost ($) | vs default | within SLO | served | p95 latency (s) | cold starts "
             "| failed | mean target |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        base = next(r for r in rows if r["trace"] == row["trace"] and r["policy"] == "knative-default")
        lines.append(
            f"| {row['trace']} | {row['scenario']} | {row['policy']} | {row['cost']:.2f} | {row['cost'] / base['cost'] - 1:+.1%} | "
            f"{row['slo_attainment']:.2%} | {row['served_share']:.3%} | {row['p95_latency_s']:.1f} | {row['cold_starts']} | "
            f"{row['failed']:.0f} | {row['mean_target']:.0f} |")
    lines.append("")
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
