"""What the operator knows of the gateway, read once at start (`operator run --runtime-key-file
--gateway-namespace`): sandbox and warm pods' runtimes are given verifiers derived from its key."""

from dataclasses import dataclass
from pathlib import Path

from agentkube.operator import sandbox


@dataclass
class GatewaySettings:
    """What the operator knows of the gateway: the key it shares with it (sandbox runtimes then serve the
    gateway, each with its own token derived from it) and the namespace its pods run in."""

    runtime_key: bytes | None = None
    namespace: str = sandbox.DEFAULT_GATEWAY_NAMESPACE


gateway = GatewaySettings()


def configure_gateway(runtime_key_file: Path | None, namespace: str | None) -> None:
    """Read the shared key once at start. Its bytes are never logged."""
    gateway.runtime_key = Path(runtime_key_file).read_bytes().strip() if runtime_key_file else None
    if gateway.runtime_key is not None and len(gateway.runtime_key) < 32:
        raise ValueError(f"the runtime key in {runtime_key_file} is shorter than 32 bytes")
    gateway.namespace = namespace or sandbox.DEFAULT_GATEWAY_NAMESPACE
