"""Limit resolution for tool calls: intent > profile > history > sandbox default, never above the envelope."""

import pytest
from pydantic import ValidationError

from agentkube.ebpf.limits import (
    Profile,
    HISTORY_MARGIN,
    MAX_ALLOW_RULES,
    MIN_CALL_MEMORY,
    PROFILES,
    Envelope,
    Intent,
    Limits,
    MiB,
    GiB,
    OutOfEnvelope,
    command_signature,
    memory_from_history,
    parse_network,
    parse_size,
    percentile,
    resolve_limits,
)

DEFAULTS = Limits(memory=512 * MiB, cpu=1.0, pids=256, timeout=300, network="loopback")
ENVELOPE = Envelope(memory=2 * GiB, cpu=2.0, pids=1024, timeout=3600)


@pytest.mark.parametrize("text, size", [("64Mi", 64 * MiB), ("1Gi", GiB), ("512", 512), ("1.5Gi", int(1.5 * GiB)),
                                        ("2G", 2 * 10**9), ("100K", 100_000), (4096, 4096)])
def test_sizes_parse_like_kubernetes_quantities(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "lots", "-5Mi", 0, -1, True, "5Xi"])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_nothing_declared_takes_the_sandbox_defaults():
    resolved = resolve_limits(Intent(), [], DEFAULTS, ENVELOPE)
    assert resolved.limits == DEFAULTS
    assert set(resolved.sources.values()) == {"default"}


def test_explicit_intent_beats_profile_and_profile_beats_default():
    resolved = resolve_limits(Intent(profile="shell", memory="100Mi"), [], DEFAULTS, ENVELOPE)
    assert resolved.limits.memory == 100 * MiB and resolved.sources["memory"] == "intent"
    assert resolved.limits.pids == PROFILES["shell"].pids and resolved.sources["pids"] == "profile"
    assert resolved.limits.network == "none" and resolved.sources["network"] == "profile"


def test_history_p95_with_margin_beats_default_but_not_intent():
    peaks = [100 * MiB] * 19 + [300 * MiB]  # p95 of 20 samples is the 19th value
    resolved = resolve_limits(Intent(), peaks, DEFAULTS, ENVELOPE)
    assert resolved.sources["memory"] == "history"
    assert resolved.limits.memory == int(100 * MiB * HISTORY_MARGIN)
    assert resolve_limits(Intent(memory="1Gi"), peaks, DEFAULTS, ENVELOPE).limits.memory == GiB


def test_history_needs_enough_samples():
    assert memory_from_history([100 * MiB, 200 * MiB]) is None
    assert resolve_limits(Intent(), [100 * MiB] * 2, DEFAULTS, ENVELOPE).sources["memory"] == "default"


def test_history_and_profiles_are_clamped_to_the_envelope():
    huge = [10 * GiB] * 10
    assert resolve_limits(Intent(), huge, DEFAULTS, ENVELOPE).limits.memory == ENVELOPE.memory
    build = resolve_limits(Intent(profile="build"), [], DEFAULTS, ENVELOPE)
    assert build.limits.memory == ENVELOPE.memory  # the profile's 4Gi
    assert build.limits.timeout == PROFILES["build"].timeout  # under the envelope: kept


@pytest.mark.parametrize("field, value", [("memory", "3Gi"), ("cpu", 4.0), ("pids", 5000), ("timeout", 7200)])
def test_explicit_requests_above_the_envelope_are_refused(field, value):
    with pytest.raises(OutOfEnvelope, match=field):
        resolve_limits(Intent(**{field: value}), [], DEFAULTS, ENVELOPE)


def test_memory_high_sits_below_memory_max():
    limits = resolve_limits(Intent(memory="64Mi"), [], DEFAULTS, ENVELOPE).limits
    assert MIN_CALL_MEMORY // 2 <= limits.memory_high < limits.memory


def test_percentile_is_an_observed_value():
    assert percentile([5, 1, 4, 2, 3], 0.95) == 5
    assert percentile(list(range(1, 101)), 0.95) == 95
    with pytest.raises(ValueError):
        percentile([], 0.5)


@pytest.mark.parametrize("argv, signature", [
    (["pytest", "tests/test_x.py::test_y"], "pytest test_x.py"),
    (["/usr/bin/make", "-j4", "test"], "make test"),
    (["python", "-m", "pytest", "-x"], "python pytest"),
    (["ls"], "ls"),
])
def test_command_signature_ignores_options(argv, signature):
    assert command_signature(argv) == signature


def test_network_policies_parse():
    assert parse_network("none").mode == "none"
    assert parse_network("loopback").mode == "loopback"
    allow = parse_network(["10.0.0.0/8:443", "127.0.0.1:*", "[::1]:8080"])
    assert allow.mode == "allowlist"
    assert [(str(r.network), r.port) for r in allow.rules] == [("10.0.0.0/8", 443), ("127.0.0.1/32", 0), ("::1/128", 8080)]
    assert parse_network("10.0.0.0/8:443,127.0.0.1:80").rules[1].port == 80
    assert parse_network(allow.describe()) == allow


@pytest.mark.parametrize("bad", ["everything", ["10.0.0.0/8"], ["300.1.1.1:80"], ["10.0.0.0/8:99999"], [],
                                 [f"10.0.0.{i}:80" for i in range(MAX_ALLOW_RULES + 1)]])
def test_bad_network_policies_are_refused(bad):
    with pytest.raises(ValueError):
        parse_network(bad)


def test_intent_validates_its_fields():
    with pytest.raises(ValidationError, match="unknown profile"):
        Intent(profile="Not A Profile")
    with pytest.raises(ValidationError):
        Intent(cpu=-1)
    with pytest.raises(ValidationError):
        Intent(surprise=1)
    assert Intent(memory="64Mi").memory == 64 * MiB


def test_sandbox_specs_parse_their_default_sizes_too():
    from agentkube.ebpf.models import SandboxCreate

    spec = SandboxCreate(name="s")
    assert spec.envelope.memory == 2 * GiB and spec.defaults.memory == 512 * MiB
    assert spec.defaults.limits().memory <= spec.envelope.envelope().memory


def test_a_sandbox_names_its_own_profiles_beside_the_built_in_ones():
    own = PROFILES | {"test": Profile(memory="3Gi", timeout=900), "lint": Profile(cpu=0.25, network="none")}
    heavier = resolve_limits(Intent(profile="test"), [], DEFAULTS, ENVELOPE, own)
    assert heavier.limits.memory == 2 * GiB and heavier.sources["memory"] == "profile"  # clamped to the envelope
    assert heavier.limits.timeout == 900 and heavier.limits.pids == DEFAULTS.pids
    assert resolve_limits(Intent(profile="lint"), [], DEFAULTS, ENVELOPE, own).limits.cpu == 0.25
    with pytest.raises(OutOfEnvelope, match="unknown profile 'gigantic'"):
        resolve_limits(Intent(profile="gigantic"), [], DEFAULTS, ENVELOPE, own)
