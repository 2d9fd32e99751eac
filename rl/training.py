"""PPO training with stable-baselines3, and export of the actor to a NumPy-only policy file.

Needs the `train` extra (stable-baselines3, torch, gymnasium). The default policy shipped in
`agentkube/rl/policies/` is reproduced by `agentkube rl train` with its defaults (`TrainConfig`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from agentkube.rl.constraint import SLOMultiplier
from agentkube.rl.env import AutoscalingEnv, EnvConfig
from agentkube.rl.episodes import RewardWeights
from agentkube.rl.knative import total_target
from agentkube.rl.observation import Decision, action_from_decision
from agentkube.rl.policy import ExportedPolicy, load_policy, save_policy
from agentkube.rl.traces import Trace

__all__ = ["TrainConfig", "train_ppo", "export_sb3_policy", "load_actor", "initial_action_mean", "train_command"]


@dataclass(frozen=True)
class TrainConfig:
    # 2M: with the warm-pod floor as a third action, 1M steps left the policy near its starting point
    # (mean target ~100, +0.3..+7% against the default); 2M (13-18 min with one thread) lands
    # at the default's attainment on every evaluation trace for -0.9..+3.5% (bench/rl_policy_compare.py).
    total_steps: int = 2_000_000
    n_envs: int = 4
    seed: int = 0
    # 10 epochs at 5e-4 get more out of each sample than 5 at 3e-4 (at 300k steps, all else equal: 9-10%
    # cheaper than the default instead of 3-5%); stepping the simulator, not the update, bounds the budget.
    learning_rate: float = 5e-4
    n_steps: int = 512  # per environment per update
    batch_size: int = 256
    n_epochs: int = 10
    # ~20 decisions (10 min) of horizon: a target's consequences (a 60 s stable window, 20-30 s cold
    # starts, the scale-down rate) play out within minutes; 0.99 (50 min) added variance and learned slower.
    gamma: float = 0.95
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    hidden: tuple[int, ...] = (64, 64)
    # Explore ±0.3 around the mean action (x/÷1.7 on the target). With ±0.6 (x/÷3) the noise alone
    # pushed the sampled targets into SLO misses, so the learnt mean stayed timid (~90 at 300k steps).
    log_std_init: float = -1.2
    torch_threads: int = 1
    env: EnvConfig = field(default_factory=EnvConfig)
    # Start the actor from an exported policy (same layout) instead of Knative's default: constrained
    # fine-tuning of the shipped policy. The critic and the exploration noise start afresh.
    init_from: str | None = None


def initial_action_mean(config: TrainConfig) -> np.ndarray:
    """Where the policy's action mean starts: Knative's default target (SB3 starts it near 0, a target
    of 63, which the policy would first have to climb out of), half the replicas on spot (the
    middle of the range: 0 is its edge), and no warm-pod floor (Knative's own behaviour)."""
    start = action_from_decision(Decision(total_target(config.env.sim.knative), 0.5, 0.0), config.env.bounds)
    return start[: config.env.action_size]


def export_sb3_policy(model, metadata: dict | None = None) -> ExportedPolicy:
    """The deterministic actor of an SB3 `PPO('MlpPolicy')` model (a Box action space, no observation
    normalisation) as NumPy weights: policy MLP then the action-mean layer."""
    import torch

    policy = model.policy
    layers = [m for m in policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [policy.action_net]
    activations = {type(m).__name__ for m in policy.mlp_extractor.policy_net if not isinstance(m, torch.nn.Linear)}
    if activations - {"Tanh", "ReLU"} or len(activations) > 1:
        raise ValueError(f"unsupported activations {activations}")
    activation = "relu" if activations == {"ReLU"} else "tanh"
    weights = tuple(layer.weight.detach().cpu().numpy().astype(np.float32) for layer in layers)
    biases = tuple(layer.bias.detach().cpu().numpy().astype(np.float32) for layer in layers)
    return ExportedPolicy(weights, biases, activation, metadata=metadata or {})


def train_ppo(
    config: TrainConfig, output: str | Path, on_progress: Callable[[int, int], None] | None = None,
    traces: Sequence[Trace] | None = None,
):
    """Train PPO on the training traces (default: those `config.env` names) and write the exported
    policy to `output`; returns the SB3 model."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(config.torch_threads)
    # Any given traces are shared by every environment copy (they run in this process).
    traces = list(traces) if traces is not None else None  # None: a fresh randomised workload per episode
    # Constrained training: one λ for every environment copy, updated after each rollout (all copies
    # run in this process, DummyVecEnv).
    multiplier = SLOMultiplier(config.env.constraint) if config.env.constraint.active else None
    env = make_vec_env(lambda: AutoscalingEnv(config.env, traces, multiplier), n_envs=config.n_envs, seed=config.seed)
    probe = AutoscalingEnv(config.env, traces, multiplier, probe=True) if multiplier is not None else None
    probe_observation = probe.reset(seed=config.seed + 10_000)[0] if probe is not None else np.zeros(0, np.float32)

    class Progress(BaseCallback):
        def _on_step(self) -> bool:
            if on_progress is not None:
                on_progress(self.num_timesteps, config.total_steps)
            return True

        def _on_rollout_end(self) -> None:
            nonlocal probe_observation
            if multiplier is None or probe is None:
                return
            # The deterministic policy, episode after episode, beside Knative's default (`probe`).
            for _ in range(config.env.constraint.probe_steps):
                action, _ = self.model.predict(probe_observation, deterministic=True)
                probe_observation, _, _, truncated, _ = probe.step(action)
                if truncated:
                    probe_observation = probe.reset()[0]
            multiplier.update()  # after the rollout: the rewards just collected keep the λ they had

    model = PPO(
        "MlpPolicy", env, learning_rate=config.learning_rate, n_steps=config.n_steps, batch_size=config.batch_size,
        n_epochs=config.n_epochs, gamma=config.gamma, gae_lambda=config.gae_lambda, ent_coef=config.ent_coef,
        policy_kwargs=dict(net_arch=dict(pi=list(config.hidden), vf=list(config.hidden)), log_std_init=config.log_std_init),
        seed=config.seed, device="cpu", verbose=0,
    )
    with torch.no_grad():  # the action layer's weights start near 0 (SB3's gain 0.01): the bias is the start
        bias = cast(torch.Tensor, model.policy.action_net.bias)  # a Module attribute: typed as Tensor | Module
        bias.copy_(torch.as_tensor(initial_action_mean(config)))
    base = load_policy(config.init_from) if config.init_from else None
    if base is not None:
        load_actor(model, base)
    started = time.perf_counter()
    model.learn(total_timesteps=config.total_steps, callback=Progress())
    metadata = {
        "trained_steps": int(model.num_timesteps),
        "training_seconds": round(time.perf_counter() - started, 1),
        "train_config": _jsonable(asdict(config)),
        "command": train_command(config),
    }
    if base is not None:  # the chain that reproduces this policy starts with the base's own command
        metadata["base_command"] = (base.metadata or {}).get("command", "unknown")
        metadata["base_training_seconds"] = (base.metadata or {}).get("training_seconds")
    if multiplier is not None:  # where λ went (every 10th rollout) and its last value, for the report
        metadata["slo_multiplier"] = {"final": round(multiplier.value, 3), "gap_ema_points": multiplier.gap_ema_points,
                                      "history": multiplier.history[::10]}
    save_policy(export_sb3_policy(model, metadata), output)
    return model


def load_actor(model, policy: ExportedPolicy) -> None:
    """Put an exported actor's weights into an SB3 `PPO('MlpPolicy')` model of the same shape (the inverse
    of `export_sb3_policy`)."""
    import torch

    layers = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, torch.nn.Linear)] + [model.policy.action_net]
    shapes = [tuple(layer.weight.shape) for layer in layers]
    if shapes != [w.shape for w in policy.weights]:
        raise ValueError(f"the policy's layers {[w.shape for w in policy.weights]} do not fit the model's {shapes}")
    with torch.no_grad():
        for layer, weight, bias in zip(layers, policy.weights, policy.biases, strict=True):
            layer.weight.copy_(torch.as_tensor(weight))
            layer.bias.copy_(torch.as_tensor(bias))


def train_command(config: TrainConfig) -> str:
    """The `agentkube rl train` command line that reproduces `config` (the CLI's options)."""
    command = f"agentkube rl train --steps {config.total_steps} --seed {config.seed} --envs {config.n_envs}"
    if config.env.weights.slo_miss != RewardWeights().slo_miss:
        command += f" --slo-weight {config.env.weights.slo_miss:g}"
    if config.env.constraint.active:
        command += f" --constraint {config.env.constraint.mode}"
    if config.init_from:
        command += f" --init-from {config.init_from}"
    return command + ("" if config.env.warm_floor else " --no-warm-floor")


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
