"""What limits a tool call gets: pure functions of the call's intent, its history and the sandbox.

Order of precedence, per limit: the intent the agent declares (explicit value, else its named profile),
then what past calls with the same command signature needed (p95 of observed peaks with a margin), then
the sandbox's default. Nothing may exceed the sandbox's envelope: an explicit request above it is refused
(the agent asked for something it cannot have), while history and defaults are clamped to it.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # names: sandboxes, namespaces, profiles
MiB = 1024 * 1024
GiB = 1024 * MiB

# memory.high sits below memory.max so that a call is throttled (reclaimed) before it is killed.
MEMORY_HIGH_FRACTION = 0.9
# History: a command needs this many observed runs before its p95 is trusted, and gets this margin on top.
HISTORY_MIN_SAMPLES = 3
HISTORY_MARGIN = 1.5
HISTORY_WINDOW = 50  # most recent peaks kept per command signature
MIN_CALL_MEMORY = 16 * MiB  # below this a shell cannot even start
MAX_ALLOW_RULES = 16  # one source of truth with the BPF program's MAX_RULES (passed to it as a define)
MAX_PROFILES = 16  # named intents per sandbox
CPU_PERIOD_US = 100_000

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?)?[bB]?\s*$")
_SIZE_FACTORS = {None: 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4,
                 "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a Kubernetes-style quantity ("64Mi", "1G", "512")."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a quantity like 64Mi")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a quantity like 64Mi, 2Gi)")
    size = int(float(match.group(1)) * _SIZE_FACTORS[match.group(2)])
    if size <= 0:
        raise ValueError("a size must be positive")
    return size


NetworkMode = Literal["all", "none", "loopback", "allowlist"]


@dataclass(frozen=True)
class AllowRule:
    """One egress destination: an IP network and a port (0 = any port)."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    port: int

    def __str__(self) -> str:
        host = f"[{self.network}]" if self.network.version == 6 else str(self.network)
        return f"{host}:{self.port or '*'}"


@dataclass(frozen=True)
class NetworkPolicy:
    mode: NetworkMode
    rules: tuple[AllowRule, ...] = ()

    def describe(self) -> str:
        return ",".join(map(str, self.rules)) if self.mode == "allowlist" else self.mode


def parse_allow_rule(text: str) -> AllowRule:
    """"10.0.0.0/8:443", "127.0.0.1:8080", "[::1]:80", "192.168.1.5:*" (port required; * = any)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not CIDR:port: {text!r} (e.g. 10.0.0.0/8:443, [::1]:80, 127.0.0.1:*)")
    try:
        network = ipaddress.ip_network(host, strict=False)
    except ValueError as error:
        raise ValueError(f"not an IP network in {text!r}: {error}") from None
    if port == "*":
        return AllowRule(network, 0)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a port in {text!r}: {port!r} (1-65535 or *)")
    return AllowRule(network, int(port))


def parse_network(value: str | Sequence[str]) -> NetworkPolicy:
    """"all", "none", "loopback", or an allow-list of CIDR:port (a list, or one comma-separated string)."""
    if isinstance(value, str):
        if value in ("all", "none", "loopback"):
            return NetworkPolicy(value)
        value = [part for part in value.split(",") if part.strip()]
    rules = tuple(parse_allow_rule(item) for item in value)
    if not rules:
        raise ValueError("an allow-list needs at least one CIDR:port (or use none / loopback / all)")
    if len(rules) > MAX_ALLOW_RULES:
        raise ValueError(f"at most {MAX_ALLOW_RULES} allow-list rules, got {len(rules)}")
    return NetworkPolicy("allowlist", rules)


class Envelope(BaseModel):
    """The most any call in a sandbox may get (the sandbox's own cgroup holds these too)."""

    model_config = ConfigDict(frozen=True)

    memory: int = Field(gt=0)
    cpu: float = Field(gt=0)
    pids: int = Field(gt=0)
    timeout: float = Field(gt=0)


class Limits(Envelope):
    """Concrete limits of one call; every field set. Sizes in bytes, CPU in cores, time in seconds."""

    network: str = "all"

    @property
    def memory_high(self) -> int:
        return memory_high_for(self.memory)

    @property
    def cpu_quota_us(self) -> int:
        return max(1000, round(self.cpu * CPU_PERIOD_US))


class Profile(BaseModel):
    """Limits a call can name at once: a built-in profile, a sandbox's own, or (as `Intent`) a call's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory: int | str | None = None
    cpu: float | None = Field(default=None, gt=0)
    pids: int | None = Field(default=None, gt=0)
    timeout: float | None = Field(default=None, gt=0)
    network: str | list[str] | None = None

    @field_validator("memory")
    @classmethod
    def _size(cls, value):
        return None if value is None else parse_size(value)

    @field_validator("network")
    @classmethod
    def _network(cls, value):
        if value is not None:
            parse_network(value)
        return value


class Intent(Profile):
    """What the agent declares for one call: a profile, explicit values, or nothing."""

    profile: str | None = None

    @field_validator("profile")
    @classmethod
    def _profile(cls, value):
        # Which names exist is the sandbox's to say (its own profiles beside the built-in ones).
        if value is not None and not DNS_LABEL.match(value):
            raise ValueError(f"unknown profile {value!r}: a profile is named by a DNS label")
        return value


# Named intents an agent can declare instead of numbers. Shapes follow what coding agents' tool calls
# need (AgentCgroup: quick shell commands stay small; builds and test runs burst to GBs).
PROFILES: dict[str, Profile] = {
    "shell": Profile(memory=256 * MiB, cpu=0.5, pids=64, timeout=60, network="none"),
    "test": Profile(memory=2 * GiB, cpu=1.0, pids=512, timeout=600, network="loopback"),
    "build": Profile(memory=4 * GiB, cpu=2.0, pids=1024, timeout=1800, network="loopback"),
    "fetch": Profile(memory=512 * MiB, cpu=0.5, pids=64, timeout=120, network="all"),
}

LimitSource = Literal["intent", "profile", "history", "default"]


class ResolvedLimits(BaseModel):
    limits: Limits
    sources: dict[str, LimitSource]


class OutOfEnvelope(ValueError):
    """An explicitly requested limit is above what the sandbox allows."""


def memory_high_for(memory_max: int) -> int:
    return max(MIN_CALL_MEMORY // 2, int(memory_max * MEMORY_HIGH_FRACTION))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile (no interpolation: a p95 is a value that was observed)."""
    if not values:
        raise ValueError("percentile of nothing")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def memory_from_history(peaks: Sequence[int]) -> int | None:
    """p95 of the observed peaks times the margin, or None while there are too few observations."""
    if len(peaks) < HISTORY_MIN_SAMPLES:
        return None
    return max(MIN_CALL_MEMORY, int(percentile(peaks, 0.95) * HISTORY_MARGIN))


def command_signature(argv: Sequence[str]) -> str:
    """Which past calls count as "the same command": the program and its first non-option word
    (`pytest`, `make test`, `python -m pytest` -> `python pytest`), so that arguments such as file
    names or test ids do not split the history, while `make` and `make test` stay apart."""
    if not argv:
        raise ValueError("empty argv")
    program = os.path.basename(argv[0])
    words = [program]
    for arg in argv[1:]:
        if arg.startswith("-"):
            continue
        word = arg.split("::", 1)[0]  # pytest node ids name one test of a file
        words.append(os.path.basename(word) if "/" in word else word)
        break
    return " ".join(words)[:128]


def resolve_limits(intent: Intent, history_peaks: Sequence[int], defaults: Limits, envelope: Envelope,
                   profiles: Mapping[str, Profile] = PROFILES) -> ResolvedLimits:
    """The limits one call gets. Raises OutOfEnvelope when the agent explicitly asks for more than the
    envelope (or names a profile the sandbox does not have); anything not asked for explicitly is clamped
    to the envelope instead."""
    if intent.profile and intent.profile not in profiles:
        raise OutOfEnvelope(f"unknown profile {intent.profile!r}; this sandbox has: {', '.join(sorted(profiles))}")
    profile = profiles[intent.profile] if intent.profile else Profile()
    history_memory = memory_from_history(history_peaks)
    values: dict[str, object] = {}
    sources: dict[str, LimitSource] = {}
    for name in ("memory", "cpu", "pids", "timeout", "network"):
        explicit = getattr(intent, name)
        if explicit is not None:
            values[name], sources[name] = explicit, "intent"
        elif getattr(profile, name) is not None:
            values[name], sources[name] = getattr(profile, name), "profile"
        elif name == "memory" and history_memory is not None:
            values[name], sources[name] = history_memory, "history"
        else:
            values[name], sources[name] = getattr(defaults, name), "default"
    for name in ("memory", "cpu", "pids", "timeout"):
        ceiling = getattr(envelope, name)
        if values[name] > ceiling:
            if sources[name] == "intent":
                raise OutOfEnvelope(f"{name} {values[name]} is above the sandbox's envelope of {ceiling}")
            values[name] = ceiling
    network = values["network"]
    values["network"] = parse_network(network).describe() if not isinstance(network, str) else network
    values["memory"] = max(MIN_CALL_MEMORY, int(values["memory"]))
    return ResolvedLimits(limits=Limits(**values), sources=sources)
