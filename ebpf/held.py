"""The held process of the runtime's warm pool (`programs/held.c`): where its binary is, built if need be.

It is compiled at host or image setup time (`make ebpf-host`, the sandbox image), statically, and cached
outside the repository under a name that carries its source's hash, so a changed source is rebuilt.
Without it (no compiler, an image without it) the runtime falls back to holding a shell per call.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).parent / "programs" / "held.c"
ENV = "AGENTKUBE_HELD"  # an explicit path (the sandbox image sets it)
COMMAND_FD = 3  # as in held.c
READY_FD = 4
RELEASE_FD = 5
RELEASE = b"g"  # the byte on its release pipe (fd 5) that lets a held process read its command and exec it


def cache_dir() -> Path:
    return Path(os.environ.get("AGENTKUBE_CACHE") or Path.home() / ".cache" / "agentkube") / "bin"


def cached_path(source: bytes) -> Path:
    return cache_dir() / f"agentkube-held-{hashlib.sha256(source).hexdigest()[:16]}"


def command_frame(cwd: str | None, argv: list[str], env: dict[str, str] | None = None) -> bytes:
    """What the held process reads on its command fd, NUL-ended strings: the working directory, how many
    variables follow, each as NAME=VALUE (set before the exec), then the argv."""
    variables = [f"{name}={value}" for name, value in (env or {}).items()]
    return b"".join(part.encode() + b"\0" for part in [cwd or "", str(len(variables)), *variables, *argv])


def build(target: Path, source: Path = SOURCE) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / "held"
        subprocess.run(["cc", "-static", "-O2", "-o", str(out), str(source)], check=True, capture_output=True, text=True)
        out.replace(target)
    return target


def held_binary(build_if_missing: bool = True) -> Path | None:
    """The held program to use: $AGENTKUBE_HELD if set, else the cached build of this source (built now if
    a C compiler is at hand and `build_if_missing`); None when there is none."""
    explicit = os.environ.get(ENV)
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    target = cached_path(SOURCE.read_bytes())
    if target.is_file():
        return target
    if build_if_missing and shutil.which("cc"):
        try:
            return build(target)
        except (OSError, subprocess.CalledProcessError):
            return None
    return None


if __name__ == "__main__":  # `python -m agentkube.ebpf.held`: build it (host setup) and print where it is
    print(held_binary())
