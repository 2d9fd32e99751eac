"""Which replicas reconcile what when the operator runs as N shards (`agentkube operator run --shard I/N`).

Kopf's peering keeps one replica active per peering name, so one peering group reconciles everything. A
shard is a peering group of its own (its active replica and a standby) that reconciles only the sandboxes
of the namespaces that hash to it. By namespace, so a sandbox and its pod (same namespace) are always on
the same shard. ServedModels, their Knative Services, the capacity handlers and the autoscaling loop stay
on shard 0 (`main.handler_modules`: the other shards do not load them): they are few, and each model's
target must have one writer.

Pure: the shard of a namespace is a function of its name and N alone, the same in every process (hence
SHA-256, never Python's `hash()`, which is salted per process). Changing N moves namespaces between
shards; for the moment both old and new owner may reconcile one sandbox, which is safe because every
write the sandbox handlers make is idempotent (creates that accept 409, deletes with a uid precondition,
status computed from the object alone)."""

import hashlib
import re
from dataclasses import dataclass
from typing import Any

SHARD_PATTERN = re.compile(r"^(\d+)/(\d+)$")


def shard_of(namespace: str, count: int) -> int:
    """The shard, in [0, count), that reconciles the sandboxes of `namespace`."""
    if count < 1:
        raise ValueError(f"a shard count must be at least 1, not {count}")
    digest = hashlib.sha256(namespace.encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class Shard:
    """This process's part: shard `index` of `count`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count}: needs 0 <= I < N and N >= 1")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """`I/N`, as the command line and the chart give it."""
        match = SHARD_PATTERN.match(text.strip())
        if match is None:
            raise ValueError(f"shard {text!r}: expected I/N, e.g. 0/2")
        return cls(int(match[1]), int(match[2]))

    def owns(self, namespace: str | None) -> bool:
        """Whether this shard reconciles the sandboxes (and their pods) of `namespace`."""
        return self.count == 1 or (namespace is not None and shard_of(namespace, self.count) == self.index)

    @property
    def serves_models(self) -> bool:
        """ServedModels, the autoscaling loop and capacity: shard 0 only."""
        return self.index == 0

    def peering_name(self, base: str) -> str:
        """The ClusterKopfPeering this shard's replicas agree through. One shard keeps the name it always
        had, so a single-shard install is exactly what it was before sharding."""
        return base if self.count == 1 else f"{base}-shard-{self.index}"


# This process's shard: set once by `main.run` before Kopf starts, read by the sandbox handlers' `when=`.
current = Shard()


def configure(shard: Shard) -> None:
    global current
    current = shard


# Kopf calls a `when=` filter with the event's kwargs before the handler: an event another shard owns is
# dropped there, before any request or thread is spent on it.
def in_this_shard(namespace: str | None = None, **_: Any) -> bool:
    return current.owns(namespace)
