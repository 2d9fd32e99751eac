"""Exported policies, run with NumPy alone (the operator never imports torch).

An exported policy is one `.npz` file: the actor's weight matrices and biases (`w0, b0, w1, b1, ...`,
the last layer giving the action mean), the activation between layers, and the observation fields and
action bounds it was trained with, so a mismatch with the running code is caught at load time.

    policy = load_policy()                      # the default policy shipped in this package
    decision = policy.decide(observation)       # Decision(target=..., spot_share=...)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from agentkube.rl.observation import OBSERVATION_FIELDS, ActionBounds, Decision, decision_from_action

__all__ = ["ExportedPolicy", "load_policy", "save_policy", "DEFAULT_POLICY_FILE", "default_policy_path"]

DEFAULT_POLICY_FILE = "ppo_default.npz"
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0)}


def default_policy_path() -> Path:
    """The trained policy shipped with agentkube (package data of `agentkube.rl.policies`)."""
    return Path(str(resources.files("agentkube.rl.policies") / DEFAULT_POLICY_FILE))


@dataclass(frozen=True)
class ExportedPolicy:
    """A deterministic MLP actor: observation -> action mean in [-1, 1]^2 -> `Decision`."""

    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activation: str = "tanh"
    bounds: ActionBounds = ActionBounds()
    observation_fields: tuple[str, ...] = OBSERVATION_FIELDS
    metadata: dict | None = None

    def action(self, observation: np.ndarray) -> np.ndarray:
        """The raw action (clipped to [-1, 1]) for one observation or a batch of them."""
        x = np.asarray(observation, dtype=np.float32)
        act = _ACTIVATIONS[self.activation]
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = x @ w.T + b
            if i < len(self.weights) - 1:
                x = act(x)
        return np.clip(x, -1.0, 1.0)

    def decide(self, observation: np.ndarray, spot_allowed: bool | None = None) -> Decision:
        """The target and spot share for one observation. Spot is allowed when the observation says so
        (its `spot_allowed` field) unless `spot_allowed` overrides it."""
        if spot_allowed is None:
            spot_allowed = bool(observation[OBSERVATION_FIELDS.index("spot_allowed")] > 0.5)
        return decision_from_action(self.action(observation), self.bounds, spot_allowed)


def save_policy(policy: ExportedPolicy, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f"w{i}": w for i, w in enumerate(policy.weights)} | {f"b{i}": b for i, b in enumerate(policy.biases)}
    header = {
        "format": 1,
        "activation": policy.activation,
        "bounds": asdict(policy.bounds),
        "observation_fields": list(policy.observation_fields),
        "metadata": policy.metadata or {},
    }
    with open(path, "wb") as handle:
        np.savez(handle, **{"header": np.array(json.dumps(header)), **arrays})  # type: ignore[arg-type]
    return path


def load_policy(path: str | Path | None = None) -> ExportedPolicy:
    """Load an exported policy (default: the one shipped with agentkube)."""
    with np.load(default_policy_path() if path is None else path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        layers = sum(1 for key in data.files if key.startswith("w"))
        weights = tuple(data[f"w{i}"].astype(np.float32) for i in range(layers))
        biases = tuple(data[f"b{i}"].astype(np.float32) for i in range(layers))
    if header.get("format") != 1:
        raise ValueError(f"unknown policy format {header.get('format')!r}")
    if tuple(header["observation_fields"]) != OBSERVATION_FIELDS:
        raise ValueError("the policy was trained on different observation fields than this agentkube builds")
    return ExportedPolicy(weights, biases, header["activation"], ActionBounds(**header["bounds"]),
                          tuple(header["observation_fields"]), header["metadata"])
