"""Trained policies shipped with agentkube (package data); see `agentkube.rl.policy.load_policy`."""
