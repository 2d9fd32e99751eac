"""Can any schedule of targets meet the RL goal, knowing the whole trace in advance?

The goal (rl/README.md): on every evaluation trace, at least as cheap as the tuned static target and the
tuned rule, within 5% of the hindsight static target's cost, at no lower SLO attainment than Knative's
default. The static frontier at the default's attainment is the default itself, so only a target that
changes over the day can meet it. This builds the best such schedule we can find *in hindsight* — a bound
on what a policy that only sees the past (PPO) could reach — and runs it in the simulator:

1. every fixed target of the frontier is run over the trace, keeping each decision interval's cost and
   missed requests (admitted late, or failed);
2. *stitched*: for a price `mu` of a missed request, each window of the day (5, 15 and 60 minutes tried)
   takes the target whose window cost + mu × misses was lowest among the fixed runs (the pods a window
   starts with differ from the fixed run's, so that is only an estimate), and the schedule is run for real
   (`run_episode`, targets bounded per step as the operator bounds them);
3. *planned* (~20 simulated days a run; the nine traces take ~35 min with two processes): receding-horizon
   planning on branches of the simulator itself (`Simulator.branch`), every 15 minutes the target within
   one bounded step that does best over those 15 minutes and 15 more;
4. for each, `mu` is searched for the cheapest run at no lower attainment than the default's.

The bar comes from `bench/results/rl_evaluation.json` (`agentkube rl evaluate`: same traces, seeds and
simulator): the lowest of the tuned static target's and the tuned rule's costs and 1.05 × the hindsight
static target's. These are schedules found, not the best there is; but where none comes near the bar,
knowing the future is not enough to meet it with targets, and a policy that knows only the past will not.

Writes bench/results/rl_oracle.{json,md}.

    .venv/bin/python bench/rl_oracle.py [--trace NAME ...] [--jobs N]
"""

import argparse
import json
import math
import multiprocessing
import os
import time

import numpy as np
import report

from agentkube.rl.baselines import STATIC_TARGET_GRID, KnativeDefault, StaticTarget
from agentkube.rl.episodes import DECISION_INTERVAL_S, apply_decision, run_episode, warm_pods
from agentkube.rl.evaluation import GOALS, EvaluationTrace, default_suite, row_named
from agentkube.rl.observation import ActionBounds, Decision
from agentkube.rl.simulator import IntervalStats, SimConfig, Simulator

FRONTIER = tuple(t for t in STATIC_TARGET_GRID if 50.0 <= t <= 264.0)
STITCHED_WINDOW_MINUTES = (5, 15, 60)
PLAN_WINDOW_MINUTES = 15  # and as long again looked ahead
# The price of a missed request, in multiples of the default's cost per request: a geometric sweep, then
# a bisection (in log space) between the last price that missed the default's attainment and the first
# that held it. Planning costs ~20 simulated days a run, so its sweep starts at 31.6, where the stitched
# schedules held the default's attainment on most traces; where planning already holds it there, the
# search steps down the same ratio (to MIN_PRICE at the lowest) until a price misses.
PRICE_SWEEP = tuple(10.0 ** (k / 2) for k in range(0, 11))
PLAN_PRICE_SWEEP = tuple(10.0 ** (k / 2) for k in range(3, 7))
MIN_PRICE = 0.099  # 0.1, and room for the rounding of 10^(k/2) ÷ 10^(1/2)
BISECTIONS = 3
EVALUATION = report.RESULTS / "rl_evaluation.json"


class Scheduled:
    """A policy that plays a target per decision, whatever it observes. `run_episode` asks for decision k
    after interval k has run, for interval k + 1."""

    def __init__(self, targets: list[float]):
        self.targets = targets
        self.next = 1

    def reset(self) -> None:
        self.next = 1

    def decide(self, observation: np.ndarray) -> Decision:
        target = self.targets[min(self.next, len(self.targets) - 1)]
        self.next += 1
        return Decision(target, 0.0)


def missed(stats: IntervalStats) -> float:
    return max(stats.admitted - stats.within_slo, 0) + stats.failed


def window_sums(intervals: list[IntervalStats], per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(cost, missed requests) per window of `per_window` decision intervals."""
    cost = np.array([s.cost for s in intervals])
    misses = np.array([missed(s) for s in intervals])
    windows = math.ceil(len(intervals) / per_window)
    pad = windows * per_window - len(intervals)
    return (np.pad(cost, (0, pad)).reshape(windows, per_window).sum(axis=1),
            np.pad(misses, (0, pad)).reshape(windows, per_window).sum(axis=1))


def stitched(frontier: dict[float, tuple[np.ndarray, np.ndarray]], price: float, per_window: int,
             intervals: int) -> list[float]:
    """Per decision interval, the target of the window's cheapest fixed run at `price` per missed request."""
    targets = list(frontier)
    score = np.stack([frontier[t][0] + price * frontier[t][1] for t in targets])
    best = [targets[i] for i in score.argmin(axis=0)]
    return [best[k // per_window] for k in range(intervals)]


def run(schedule: list[float], trace, config: SimConfig, initial_target: float | None) -> dict:
    summary = run_episode(Scheduled(schedule), trace, config, seed=0, initial_target=initial_target)[0]
    return {"cost": summary.cost, "slo_attainment": summary.slo_attainment,
            "mean_target": float(np.mean(schedule)), "changes": int(np.count_nonzero(np.diff(schedule)))}


def search(attempt, floor: float, sweep: tuple[float, ...]) -> list[dict]:
    """Every schedule `attempt(price multiple)` ran: the sweep over prices until one holds the default's
    attainment (or, when its first price holds, down from there until one misses), then the bisection
    between the lowest price that held and the highest that missed."""
    runs: list[dict] = []

    def tried(multiple: float) -> bool:
        runs.append({**attempt(multiple), "price_multiple": multiple})
        return runs[-1]["slo_attainment"] >= floor

    below = held = None
    for multiple in sweep:
        if tried(multiple):
            held = multiple
            break
        below = multiple
    if held is not None and below is None:  # the sweep's first price held: down from it until one misses
        step = sweep[1] / sweep[0]
        while below is None and held / step >= MIN_PRICE:
            lower = held / step
            if tried(lower):
                held = lower
            else:
                below = lower
    if held is not None and below is not None:
        low, high = below, held
        for _ in range(BISECTIONS):
            middle = math.sqrt(low * high)
            low, high = (low, middle) if tried(middle) else (middle, high)
    return runs


def planned(trace, config: SimConfig, price: float, window: int, lookahead: int) -> list[float]:
    """Receding-horizon planning on the simulator itself: at each window's start, every target of the
    frontier within one bounded step of the one in force is held on a branch for the window and
    `lookahead` intervals more, and the branch whose cost + `price` × misses was lowest goes on from the
    window's end. It knows the future arrivals (the branches run the real trace); a policy has the past."""
    sim = Simulator(config)
    sim.reset(trace, seed=0, ready_pods=warm_pods(trace, sim.config, None))
    stats = sim.advance(DECISION_INTERVAL_S)
    schedule = [sim.target]
    reach = 1 + ActionBounds().max_change_fraction

    def hold(branch: Simulator, target: float, last: IntervalStats, steps: int) -> tuple[IntervalStats, float, int]:
        score, taken = 0.0, 0
        while taken < steps and not branch.done:
            apply_decision(branch, Decision(target, 0.0), last, spot_allowed=False)
            last = branch.advance(DECISION_INTERVAL_S)
            score, taken = score + last.cost + price * missed(last), taken + 1
        return last, score, taken

    while not sim.done:
        best = None
        for target in (t for t in FRONTIER if sim.target / reach <= t <= sim.target * reach):
            branch = sim.branch()
            last, score, taken = hold(branch, target, stats, window)
            kept = (branch.branch(), last, taken)
            score += hold(branch, target, last, lookahead)[1]
            if best is None or score < best[0]:
                best = (score, target, kept)
        _, target, (sim, stats, taken) = best
        schedule += [target] * taken
    return schedule


def bar_from_evaluation(trace_name: str) -> dict:
    """The goal's costs on this trace, from the committed `agentkube rl evaluate` result."""
    by = {r["policy"]: r for r in json.loads(EVALUATION.read_text())["rows"]
          if r["trace"] == trace_name and r["scenario"] == "on-demand"}
    static, rule, hindsight = (row_named(by, "static-tuned"), row_named(by, "target-tracking"),
                               row_named(by, "static-hindsight ("))
    default, ppo = by["knative-default"], by["ppo"]
    return {"default_cost": default["cost"], "ppo_cost": ppo["cost"], "ppo_slo": ppo["slo_attainment"],
            "static_tuned": static["cost"], "rule_tuned": rule["cost"], "hindsight_static": hindsight["cost"],
            "bar": min(static["cost"], rule["cost"], (1 + GOALS["gap_to_hindsight"]) * hindsight["cost"])}


def measure(names: set[str] | None, jobs: int) -> list[dict]:
    items = [item for item in default_suite() if not names or item.trace.name in names]
    with multiprocessing.Pool(jobs) as pool:
        return pool.map(oracle, items, chunksize=1)


def oracle(item: EvaluationTrace, config: SimConfig = SimConfig()) -> dict:
    """One trace: the default, the fixed targets, then every schedule searched."""
    trace = item.trace
    started = time.perf_counter()
    default = run_episode(KnativeDefault(), trace, config, seed=0)[0]
    bar = bar_from_evaluation(trace.name)
    if not math.isclose(bar["default_cost"], default.cost, rel_tol=1e-6):
        raise SystemExit(f"{trace.name}: the default costs {default.cost:.4f} here and {bar['default_cost']:.4f} in "
                         f"{EVALUATION}: run `agentkube rl evaluate` on this simulator first")
    fixed: dict[float, list[IntervalStats]] = {}
    for target in FRONTIER:
        fixed[target] = []
        run_episode(StaticTarget(target), trace, config, seed=0, initial_target=target, intervals=fixed[target])
    intervals = len(fixed[FRONTIER[0]])
    unit = default.cost / max(default.requests, 1)
    runs = []
    for minutes in STITCHED_WINDOW_MINUTES:
        per_window = minutes * 60 // DECISION_INTERVAL_S
        frontier = {t: window_sums(stats, per_window) for t, stats in fixed.items()}

        def stitched_run(multiple: float, frontier=frontier, per_window=per_window) -> dict:
            schedule = stitched(frontier, multiple * unit, per_window, intervals)
            return run(schedule, trace, config, initial_target=schedule[0])

        runs += [dict(r, method="stitched", window_minutes=minutes)
                 for r in search(stitched_run, default.slo_attainment, PRICE_SWEEP)]
    window = PLAN_WINDOW_MINUTES * 60 // DECISION_INTERVAL_S
    runs += [dict(r, method="planned", window_minutes=PLAN_WINDOW_MINUTES) for r in search(
        lambda multiple: run(planned(trace, config, multiple * unit, window, window), trace, config, None),
        default.slo_attainment, PLAN_PRICE_SWEEP)]
    best = cheapest(runs, default.slo_attainment)
    row = {"trace": trace.name, "family": item.family, "default_slo": default.slo_attainment, **bar,
           "oracle": best, "runs": runs, "reaches_bar": bool(best and best["cost"] <= bar["bar"]),
           "seconds": time.perf_counter() - started}
    print(f"{trace.name}: {len(runs)} schedules, best {best and best['cost'] / default.cost - 1:+.1%} "
          f"(bar {bar['bar'] / default.cost - 1:+.1%}), {time.perf_counter() - started:.0f} s", flush=True)
    return row


def cheapest(runs: list[dict], floor: float, method: str | None = None) -> dict | None:
    """The cheapest run (of `method`, or any) at no lower SLO attainment than `floor`."""
    qualifying = [r for r in runs if r["slo_attainment"] >= floor and method in (None, r["method"])]
    return min(qualifying, key=lambda r: r["cost"]) if qualifying else None


def method_cell(row: dict, method: str) -> str:
    if not any(r["method"] == method for r in row["runs"]):
        return "–"
    best = cheapest(row["runs"], row["default_slo"], method)
    if best is None:
        return "none at the default's SLO"
    window = f", {best['window_minutes']}" if method == "stitched" else ""
    return f"{best['cost'] / row['default_cost'] - 1:+.1%} ({best['slo_attainment']:.2%}{window})"


def markdown(rows: list[dict]) -> str:
    lines = ["Costs against Knative's default on the same trace, at no lower SLO attainment than the default's: the "
             "goal's bar (the cheapest of the tuned static target, the tuned rule and 1.05 × the hindsight static "
             "target, from `rl_evaluation.json`), the shipped PPO policy, and the cheapest hindsight target schedule "
             "found by each method (its SLO attainment; stitched: its window in minutes).", "",
             "| trace | default SLO | goal's bar | PPO (SLO) | stitched (SLO, window) | planned (SLO) | reaches the bar |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        default = r["default_cost"]
        lines.append(f"| {r['trace']} | {r['default_slo']:.2%} | {r['bar'] / default - 1:+.1%} | "
                     f"{r['ppo_cost'] / default - 1:+.1%} ({r['ppo_slo']:.2%}) | "
                     f"{method_cell(r, 'stitched')} | {method_cell(r, 'planned')} | "
                     f"{'yes' if r['reaches_bar'] else 'no'} |")
    reached = sum(r["reaches_bar"] for r in rows)
    lines += ["", f"A hindsight target schedule reaches the goal's bar on {reached} of {len(rows)} traces "
              f"({sum(len(r['runs']) for r in rows)} schedules run, {sum(r['seconds'] for r in rows) / 60:.0f} min "
              "of work over the processes).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", action="append", help="only this evaluation trace (repeatable)")
    parser.add_argument("--output", default="rl_oracle")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="traces run at once")
    args = parser.parse_args()
    rows = measure(set(args.trace or ()), args.jobs)
    report.save(args.output, {"frontier": FRONTIER, "stitched_windows_minutes": STITCHED_WINDOW_MINUTES,
                               "plan_window_minutes": PLAN_WINDOW_MINUTES, "rows": rows}, markdown(rows))


if __name__ == "__main__":
    main()
