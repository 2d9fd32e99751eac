"""The training pipeline on a tiny budget: the gymnasium env, PPO, and the NumPy export matching SB3."""

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("stable_baselines3", reason="needs the train extra")

from gymnasium.utils.env_checker import check_env  # noqa: E402

from agentkube.rl.env import AutoscalingEnv, EnvConfig  # noqa: E402
from agentkube.rl.episodes import RewardWeights  # noqa: E402
from agentkube.rl.observation import decision_from_action, warm_pod_floor  # noqa: E402
from agentkube.rl.policy import load_policy  # noqa: E402
from agentkube.rl.traces import WORKLOADS, generate_trace  # noqa: E402
from agentkube.rl.training import TrainConfig, initial_action_mean, train_command, train_ppo  # noqa: E402

SMALL = EnvConfig(episode_s=1800)


@pytest.fixture(scope="module")
def small_traces():
    return [generate_trace(WORKLOADS[w], i, 7200, name=f"{w}-{i}") for i, w in enumerate(sorted(WORKLOADS))]


def test_env_follows_the_gymnasium_api(small_traces):
    env = AutoscalingEnv(SMALL, small_traces)
    check_env(env, skip_render_check=True)
    observation, _ = env.reset(seed=3)
    steps, truncated = 0, False
    while not truncated:
        observation, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert env.observation_space.contains(observation) and reward <= 0.0 and not terminated
        steps += 1
    assert steps == SMALL.episode_s // SMALL.interval_s - 1


def test_env_is_seeded(small_traces):
    def rollout(seed):
        env = AutoscalingEnv(SMALL, small_traces)
        env.reset(seed=seed)
        return [env.step(np.array([0.2, -0.5], dtype=np.float32))[1] for _ in range(10)]

    assert rollout(1) == rollout(1)


def test_tiny_ppo_run_exports_a_policy_that_matches_sb3(tmp_path, small_traces):
    config = TrainConfig(total_steps=1024, n_envs=2, n_steps=256, batch_size=128, n_epochs=2, env=SMALL)
    seen = []
    model = train_ppo(config, tmp_path / "policy.npz", lambda done, total: seen.append(done), traces=small_traces)
    assert seen and seen[-1] >= 1024
    exported = load_policy(tmp_path / "policy.npz")
    assert exported.metadata["trained_steps"] >= 1024 and "agentkube rl train" in exported.metadata["command"]
    env = AutoscalingEnv(SMALL, small_traces)
    observations = [env.reset(seed=0)[0]]
    for _ in range(40):
        observations.append(env.step(env.action_space.sample())[0])
    rng = np.random.default_rng(0)
    batch = np.concatenate([np.array(observations), rng.uniform(-3, 3, (64, observations[0].size))]).astype(np.float32)
    sb3_actions, _ = model.predict(batch, deterministic=True)
    assert np.allclose(exported.action(batch), sb3_actions, atol=1e-5)


def test_training_starts_from_knatives_default_target():
    start = decision_from_action(initial_action_mean(TrainConfig()))
    assert start.target == pytest.approx(100.0, rel=1e-5) and start.spot_share == pytest.approx(0.5)
    assert start.warm_share == 0.0  # and no warm-pod floor: Knative's own behaviour


def test_the_warm_floor_is_an_action_unless_turned_off(small_traces):
    assert AutoscalingEnv(SMALL, small_traces).action_space.shape == (3,)
    without = replace(SMALL, warm_floor=False)
    assert AutoscalingEnv(without, small_traces).action_space.shape == (2,)
    assert initial_action_mean(TrainConfig(env=without)).shape == (2,)
    assert "--no-warm-floor" in train_command(TrainConfig(env=without))
    assert "--slo-weight 30" in train_command(TrainConfig(env=replace(SMALL, weights=RewardWeights(slo_miss=30.0))))


def test_a_step_puts_the_floor_in_force_from_the_last_intervals_peak(small_traces):
    env = AutoscalingEnv(SMALL, small_traces)
    env.reset(seed=2)
    peak = env.stats.metrics["peak_concurrency_10m"]
    env.step(np.array([0.0, -1.0, 1.0], dtype=np.float32))  # the whole recent peak kept warm
    assert peak > 0 and env.sim.min_scale == warm_pod_floor(1.0, peak, env.sim.target)
    env.step(np.array([0.0, -1.0, -1.0], dtype=np.float32))
    assert env.sim.min_scale == 0


def test_randomised_episodes_draw_other_workloads_with_history_behind_them():
    env = AutoscalingEnv(EnvConfig(episode_s=600, lead_in_s=900))
    env.reset(seed=5)
    seen = []
    for _ in range(4):
        observation, info = env.reset()
        assert info["trace"] == "randomised" and env.observation_space.contains(observation)
        # The lead-in ran under the starting target: the 10-minute features already cover 10 minutes.
        assert env.sim.t == 900 + SMALL.interval_s
        seen.append((len(env.sim.trace), env.sim.config.server.base_step_s, env.sim.config.cold_start.model_load_s))
    assert len({s[0] for s in seen}) == 4 and len({s[1] for s in seen}) == 4 and len({s[2] for s in seen}) == 4


def test_constrained_fine_tuning_starts_from_the_given_policy_and_says_how_to_reproduce_it(tmp_path, small_traces):
    from agentkube.rl.constraint import ConstraintConfig
    from agentkube.rl.policy import ExportedPolicy
    from agentkube.rl.training import load_actor

    base_config = TrainConfig(total_steps=512, n_envs=2, n_steps=256, batch_size=128, n_epochs=1, env=SMALL)
    train_ppo(base_config, tmp_path / "base.npz", traces=small_traces)
    base = load_policy(tmp_path / "base.npz")
    constrained = replace(SMALL, constraint=ConstraintConfig(mode="excess", probe_steps=64))
    config = replace(base_config, env=constrained, init_from=str(tmp_path / "base.npz"))
    # With no update at all (a zero learning rate) the fine-tuned actor is the base's, weight for weight.
    frozen = train_ppo(replace(config, learning_rate=0.0), tmp_path / "frozen.npz", traces=small_traces)
    exported = load_policy(tmp_path / "frozen.npz")
    assert all(np.array_equal(a, b) for a, b in zip(exported.weights, base.weights, strict=True))
    assert exported.metadata["base_command"] == base.metadata["command"]
    assert "--constraint excess --init-from" in exported.metadata["command"]
    # The probe ran the deterministic policy beside Knative's default after each rollout and moved λ.
    history = exported.metadata["slo_multiplier"]["history"]
    assert history and exported.metadata["slo_multiplier"]["final"] != ConstraintConfig().initial
    other_shape = ExportedPolicy((np.zeros((8, 17), np.float32),), (np.zeros(8, np.float32),), "tanh")
    with pytest.raises(ValueError, match="do not fit"):
        load_actor(frozen, other_shape)


def test_only_the_probe_records_the_constraint_and_only_excess_runs_the_default_in_training(small_traces):
    from agentkube.rl.constraint import ConstraintConfig, SLOMultiplier

    action = np.array([0.0, -1.0, -1.0], dtype=np.float32)
    for mode, runs_default in (("lagrangian", False), ("excess", True)):
        multiplier = SLOMultiplier(ConstraintConfig(mode=mode))
        env = AutoscalingEnv(replace(SMALL, constraint=multiplier.config), small_traces, multiplier)
        env.reset(seed=1)
        info = env.step(action)[4]
        assert env.runs_default == runs_default and ("default_missed_share" in info) == runs_default
        assert info["slo_multiplier"] == 40.0 and multiplier.update() == 40.0  # nothing recorded, λ unchanged
    assert "--constraint" not in train_command(TrainConfig())
