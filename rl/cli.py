"""`agentkube rl`: train the PPO autoscaler and evaluate it against the baselines."""

from __future__ import annotations

from pathlib import Path

import typer

rl_app = typer.Typer(help="The RL autoscaler: train PPO in the Knative simulator, evaluate it.", no_args_is_help=True)

DEFAULT_RESULTS = Path("bench/results")


@rl_app.command()
def train(
    steps: int = typer.Option(None, help="PPO timesteps (default: TrainConfig's)."),
    seed: int = typer.Option(0, help="Seed for PPO and the environments."),
    envs: int = typer.Option(None, help="Vectorised environment copies (default: TrainConfig's)."),
    output: Path = typer.Option(None, help="Where to write the exported policy (default: the shipped default policy)."),
    slo_weight: float = typer.Option(None, min=0.0, help="The reward's SLO weight: % more pods that 1% of requests "
                                     "missing the SLO is worth (default: RewardWeights')."),
    warm_floor: bool = typer.Option(True, help="Let the policy set a warm-pod floor (min-scale) as well as the target."),
    constraint: str = typer.Option("none", help="Train for cost at Knative's default's SLO attainment: none (the fixed "
                                   "weight), lagrangian or excess (see agentkube.rl.constraint)."),
    init_from: Path = typer.Option(None, exists=True, dir_okay=False, help="Start from this exported policy's actor "
                                   "(fine-tuning) instead of Knative's default target."),
) -> None:
    """Train PPO on the training traces and export the policy for NumPy-only inference."""
    from dataclasses import replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from agentkube.rl.constraint import CONSTRAINT_MODES, ConstraintConfig
    from agentkube.rl.policy import default_policy_path
    from agentkube.rl.training import TrainConfig, train_ppo

    config = TrainConfig(seed=seed)
    if steps is not None:
        config = replace(config, total_steps=steps)
    if envs is not None:
        config = replace(config, n_envs=envs)
    if init_from is not None:
        config = replace(config, init_from=str(init_from))
    if slo_weight is not None:
        config = replace(config, env=replace(config.env, weights=replace(config.env.weights, slo_miss=slo_weight)))
    if constraint not in CONSTRAINT_MODES:
        raise typer.BadParameter(f"one of {', '.join(CONSTRAINT_MODES)}", param_hint="--constraint")
    config = replace(config, env=replace(config.env, warm_floor=warm_floor,
                                         constraint=ConstraintConfig(mode=constraint, initial=config.env.weights.slo_miss)
                                         if constraint != "none" else ConstraintConfig()))
    output = output or default_policy_path()
    columns = ("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("training PPO", total=config.total_steps)
        train_ppo(config, output, lambda done, total: progress.update(task, completed=min(done, total)))
    typer.echo(f"policy written to {output}")


@rl_app.command()
def evaluate(
    policy: Path = typer.Option(None, help="Exported policy (default: the shipped one)."),
    out: Path = typer.Option(DEFAULT_RESULTS, help="Folder for rl_evaluation.{md,json,png}."),
    days: float = typer.Option(1.0, help="Length of each evaluation trace, in days (user traces: their first DAYS)."),
    tuning_days: float = typer.Option(1.0, help="Training-trace days used to tune the baselines."),
    trace: list[Path] = typer.Option(None, help="A BurstGPT CSV to evaluate on instead of the built-in suite (repeatable)."),
    rate_scale: float = typer.Option(1.0, min=1e-6, help="Speed-up of user traces' time (2: twice the requests per second)."),
    log_type: str = typer.Option(None, help="Keep only rows of this BurstGPT Log Type (\"Conversation log\", \"API log\")."),
) -> None:
    """Run PPO and the baselines on traces it never trained on (the workloads' evaluation days and the
    held-out families, or --trace files); write a Markdown table, JSON and plots."""
    from agentkube.rl.evaluation import EvaluationConfig, EvaluationTrace, write_report
    from agentkube.rl.evaluation import evaluate as run_evaluation
    from agentkube.rl.policy import load_policy
    from agentkube.rl.traces import TraceFormatError, load_burstgpt

    suite = None
    if trace:
        suite = []
        for path in trace:
            try:
                loaded_trace = load_burstgpt(path, rate_scale=rate_scale, log_type=log_type)
            except TraceFormatError as error:
                raise typer.BadParameter(str(error), param_hint="--trace") from None
            suite.append(EvaluationTrace(loaded_trace.window(0.0, min(loaded_trace.duration_s, days * 86_400)), "user"))
    loaded = load_policy(policy)
    config = EvaluationConfig(eval_days=days, tuning_days=tuning_days)
    rows, runs = run_evaluation(loaded, config, log=typer.echo, suite=suite)
    command = f"agentkube rl evaluate --days {days:g} --tuning-days {tuning_days:g}" + (f" --policy {policy}" if policy else "")
    command += "".join(f" --trace {path}" for path in trace or ())
    command += (f" --rate-scale {rate_scale:g}" if rate_scale != 1.0 else "") + (f" --log-type '{log_type}'" if log_type else "")
    trained = (loaded.metadata or {}).get("command", "unknown")
    header = f"Made by `{command}`; the policy by `{trained}`. Costs in $ over the trace."
    report = write_report(rows, runs, out, header)
    typer.echo(report.read_text())


@rl_app.command("serve-revision")
def serve_revision(
    namespace: str = typer.Option(..., help="Namespace of the Knative Service whose revision this plays."),
    service: str = typer.Option(..., help="The Knative Service: its target annotation is read from the API server."),
    trace: str = typer.Option("conversation", help="A generated workload (conversation, api, flash), a held-out family "
                              "(mmpp, on-off-pareto, ...) or a BurstGPT CSV."),
    trace_start: float = typer.Option(36_000.0, help="Where in the trace to start, in seconds (default: 10:00, near the peak)."),
    port: int = typer.Option(0, help="Metrics port on 127.0.0.1 (0: any free one; printed as `listening 127.0.0.1:<port>`)."),
    duration: float = typer.Option(300.0, help="Wall seconds to run before exiting."),
    speed: float = typer.Option(1.0, min=0.1, max=100.0, help="Simulated seconds per wall second."),
    seed: int = typer.Option(0, help="Seed of the simulator's random streams (cold starts, interruptions)."),
    kubeconfig: str = typer.Option(None, envvar="KUBECONFIG", help="Kubeconfig of the API server to read the Service from."),
) -> None:
    """Play a Knative revision under a trace, live: read its target from the Knative Service, serve
    Knative's metrics for Prometheus on 127.0.0.1, exit after --duration (the operator's loop under test)."""
    from agentkube.rl.live import load_trace
    from agentkube.rl.live import serve_revision as serve

    loaded = load_trace(trace, trace_start, duration * speed + 60.0)
    serve(namespace=namespace, service=service, trace=loaded, port=port, duration_s=duration, speed=speed, seed=seed,
          kubeconfig=kubeconfig, echo=typer.echo)  # click's echo flushes each line
