"""Exported PPO policies side by side on the evaluation suite of `agentkube rl evaluate`, against the same
baselines in one run: which policy (a reward weight, the warm-pod floor on or off, a training budget) comes
closest to the issue's goal.

The baselines (Knative's default, the static target and the rule tuned on the closest workload, the
hindsight static target) are run once, by `agentkube.rl.evaluation.evaluate` with the first policy; every
policy then runs on the same traces, simulator seeds and decision interval (on-demand capacity). Per
policy and trace: cost against each baseline, SLO attainment against the default's, and the goal
(no dearer than the tuned static target and rule, at no lower attainment than the default, within 5% of
the hindsight static target). Each policy's training command and wall time come from its metadata.

Writes bench/results/rl_policy_compare.{json,md} (`--name NAME`: NAME.{json,md}), with its own wall time.

    .venv/bin/python bench/rl_policy_compare.py --policy shipped=rl/policies/ppo_default.npz \\
        --policy floor-w30=/tmp/floor_w30.npz ...
"""

import argparse
import os
import time

import report as report_io

from agentkube.rl.episodes import run_episode
from agentkube.rl.evaluation import GOALS, HINDSIGHT, EvaluationConfig, default_suite, evaluate
from agentkube.rl.policy import load_policy


def _baseline(rows: list[dict], trace: str, prefix: str) -> dict:
    return next(r for r in rows if r["trace"] == trace and r["scenario"] == "on-demand" and r["policy"].startswith(prefix))


def verdict(summary, rows: list[dict], trace: str) -> dict:
    default, static = _baseline(rows, trace, "knative-default"), _baseline(rows, trace, "static-tuned")
    rule, hindsight = _baseline(rows, trace, "target-tracking"), _baseline(rows, trace, HINDSIGHT + " ")
    out = {"trace": trace, "cost_vs_default": summary.cost / default["cost"] - 1,
           "cost_vs_static_tuned": summary.cost / static["cost"] - 1, "cost_vs_rule_tuned": summary.cost / rule["cost"] - 1,
           "gap_to_hindsight": summary.cost / hindsight["cost"] - 1, "slo": summary.slo_attainment,
           "slo_default": default["slo_attainment"], "cost": summary.cost, "default_cost": default["cost"]}
    out["slo_met"] = out["slo"] >= out["slo_default"]
    out["met"] = (out["slo_met"] and out["cost_vs_static_tuned"] <= 0 and out["cost_vs_rule_tuned"] <= 0
                  and out["gap_to_hindsight"] <= GOALS["gap_to_hindsight"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policy", action="append", required=True, help="NAME=PATH of an exported policy (repeatable)")
    parser.add_argument("--days", type=float, default=1.0)
    parser.add_argument("--name", default="rl_policy_compare", help="bench/results/NAME.{json,md}")
    args = parser.parse_args()
    started = time.perf_counter()
    policies = dict(item.split("=", 1) for item in args.policy)
    loaded = {name: load_policy(path) for name, path in policies.items()}
    config = EvaluationConfig(eval_days=args.days, tuning_days=args.days)
    suite = default_suite(config.eval_days)
    rows, _ = evaluate(next(iter(loaded.values())), config, log=print, suite=suite)
    report: dict[str, dict] = {}
    for name, policy in loaded.items():
        verdicts = []
        for item in suite:
            summary = run_episode(policy, item.trace, config.sim, seed=config.seed)[0]
            verdicts.append(verdict(summary, rows, item.trace.name))
        metadata = policy.metadata or {}
        command, seconds = metadata.get("command", "unknown"), metadata.get("training_seconds")
        if "base_command" in metadata:  # fine-tuned (`--init-from`): the base's training, then this one
            command = f"{metadata['base_command']} --output BASE; then {command.split(' --init-from')[0]} --init-from BASE"
            seconds = f"{metadata.get('base_training_seconds')} + {seconds}"
        report[name] = {"command": command, "training_seconds": seconds, "outputs": int(policy.weights[-1].shape[0]),
                        "slo_multiplier": (metadata.get("slo_multiplier") or {}).get("final"), "verdicts": verdicts}
        print(f"{name}: goal met on {sum(v['met'] for v in verdicts)}/{len(verdicts)}", flush=True)
    wall_s, load = round(time.perf_counter() - started, 1), os.getloadavg()
    lines = ["# PPO policies side by side on the evaluation suite", "",
             f"Made by `.venv/bin/python bench/rl_policy_compare.py {' '.join('--policy ' + p for p in args.policy)}"
             + (f" --name {args.name}" if args.name != "rl_policy_compare" else "") + f"` in {wall_s / 60:.1f} min "
             f"(load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}); "
             "baselines as in `agentkube rl evaluate` (on-demand capacity). Per cell: cost against Knative's default, "
             "then SLO attainment against the default's (**bold** when lower).", "",
             "| policy | trained by | training (s) | floor | " + " | ".join(v["trace"] for v in next(iter(report.values()))["verdicts"])
             + " | total cost vs default | SLO ≥ default | goal met |",
             "|---|---|---:|---|" + "---:|" * len(suite) + "---:|---:|---:|"]
    for name, entry in report.items():
        cells = []
        for v in entry["verdicts"]:
            slo = f"{v['slo']:.2%}" if v["slo_met"] else f"**{v['slo']:.2%}**"
            cells.append(f"{v['cost_vs_default']:+.1%} / {slo}")
        total = sum(v["cost"] for v in entry["verdicts"]) / sum(v["default_cost"] for v in entry["verdicts"]) - 1
        trained = f"`{entry['command']}`" + (f" (final λ {entry['slo_multiplier']:g})" if entry["slo_multiplier"] else "")
        lines.append(f"| {name} | {trained} | {entry['training_seconds']} | {'yes' if entry['outputs'] > 2 else 'no'} | "
                     + " | ".join(cells) + f" | {total:+.1%} | {sum(v['slo_met'] for v in entry['verdicts'])}/{len(suite)} "
                     f"| {sum(v['met'] for v in entry['verdicts'])}/{len(suite)} |")
    lines += ["", "Default's SLO attainment per trace: " + ", ".join(
        f"{v['trace']} {v['slo_default']:.2%}" for v in next(iter(report.values()))["verdicts"]) + ".", "",
        "Against the tuned baselines and the hindsight static target, per policy and trace:", "",
        "| policy | trace | vs tuned static | vs tuned rule | gap to hindsight | goal |", "|---|---|---:|---:|---:|---|"]
    for name, entry in report.items():
        for v in entry["verdicts"]:
            lines.append(f"| {name} | {v['trace']} | {v['cost_vs_static_tuned']:+.1%} | {v['cost_vs_rule_tuned']:+.1%} "
                         f"| {v['gap_to_hindsight']:+.1%} | {'met' if v['met'] else 'missed'} |")
    report_io.save(args.name, {"wall_seconds": wall_s, "policies": report}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
