"""Container images without a registry: made here from Debian's packages and imported into containerd.

- `pause`: the pod sandbox's process, compiled statically from hack/images/pause.c.
- `sandbox`: Debian (minbase) with Python 3, plus agentkube's sandbox runtime and SDK and the few wheels
  they need; its entry point is the sandbox runtime.

Each image is an OCI archive whose layers are plain tars; building one is deterministic (sorted members,
fixed owners and times), so an unchanged image has an unchanged digest and re-importing it is a no-op.
The Debian root filesystem is the slow part (a minute or two, once) and is cached outside the checkout.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from agentkube.devenv.versions import cache_root, wheels_dir

PAUSE_IMAGE = "localhost/agentkube/pause:dev"
SANDBOX_IMAGE = "localhost/agentkube/sandbox:dev"
DEBIAN_SUITE = "bookworm"
# The sandbox image's Debian packages: Python for the runtime and the agent's own tools.
SANDBOX_PACKAGES = ("python3",)
# Wheels the runtime imports (installed from the same offline wheel cache as the project's venv).
SANDBOX_WHEELS = ("pydantic", "typer", "prometheus-client")
SITE_DIR = "opt/agentkube/lib"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"


class ImageError(RuntimeError):
    """An image could not be built; the message names the step and its output."""


@dataclass(frozen=True)
class Layer:
    path: Path
    digest: str  # sha256 hex of the uncompressed tar (also its diff id)
    size: int


def images_cache() -> Path:
    return cache_root() / "images"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layer(path: Path) -> Layer:
    return Layer(path, _sha256_file(path), path.stat().st_size)


def image_documents(layers: list[Layer], config: dict[str, Any], reference: str) -> tuple[bytes, bytes, bytes]:
    """The image config, manifest and index (JSON bytes) of an OCI image made of `layers`."""
    config_blob = json.dumps({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{item.digest}" for item in layers]},
    }, sort_keys=True).encode()
    manifest_blob = json.dumps({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config_blob), "size": len(config_blob)},
        "layers": [{"mediaType": MEDIA_LAYER, "digest": f"sha256:{item.digest}", "size": item.size} for item in layers],
    }, sort_keys=True).encode()
    index_blob = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": _digest(manifest_blob),
            "size": len(manifest_blob),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": reference,
                            "org.opencontainers.image.ref.name": reference.rsplit(":", 1)[-1]},
        }],
    }, sort_keys=True).encode()
    return config_blob, manifest_blob, index_blob


def _digest(blob: bytes) -> str:
    return f"sha256:{hashlib.sha256(blob).hexdigest()}"


def write_oci_archive(target: Path, layers: list[Layer], config: dict[str, Any], reference: str) -> Path:
    config_blob, manifest_blob, index_blob = image_documents(layers, config, reference)
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w") as archive:
        _add_bytes(archive, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        _add_bytes(archive, "index.json", index_blob)
        for blob in (config_blob, manifest_blob):
            _add_bytes(archive, f"blobs/sha256/{hashlib.sha256(blob).hexdigest()}", blob)
        for item in layers:
            archive.add(item.path, arcname=f"blobs/sha256/{item.digest}", filter=_normalise)
    partial.replace(target)
    return target


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    archive.addfile(info, io.BytesIO(data))


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def tar_directory(source: Path, target: Path) -> Path:
    """A deterministic tar of `source`'s contents (paths relative to it, owned by root)."""
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(source.rglob("*")):
            archive.add(path, arcname=str(path.relative_to(source)), recursive=False, filter=_normalise)
    partial.replace(target)
    return target


def _run(step: str, argv: list[str], **kwargs) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise ImageError(f"{step}: `{' '.join(argv)}` failed:\n{(result.stderr or result.stdout)[-3000:]}")


def _cached(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """A build product in the image cache, rebuilt only when `key` (what it is made from) changes; the
    products it replaces go (each sandbox archive is ~180 MB, and every source change makes a new one)."""
    target = images_cache() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.tar"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            build(Path(scratch))
            (Path(scratch) / "out.tar").replace(target)
        for older in target.parent.glob(f"{name}-*.tar"):
            if older != target:
                older.unlink(missing_ok=True)
    return target


def pause_archive(log=print) -> Path:
    source = Path(str(resources.files("agentkube.devenv") / "pause.c"))
    program = source.read_bytes()

    def build(scratch: Path) -> None:
        log("compiling the pause program")
        root = scratch / "rootfs"
        root.mkdir()
        _run("pause", ["cc", "-static", "-O2", "-o", str(root / "pause"), str(source)])
        archive_layers = [layer(tar_directory(root, scratch / "layer.tar"))]
        write_oci_archive(scratch / "out.tar", archive_layers, {"Entrypoint": ["/pause"]}, PAUSE_IMAGE)

    return _cached("pause", hashlib.sha256(program).hexdigest(), build)


def debian_rootfs(packages: tuple[str, ...] = SANDBOX_PACKAGES, log=print) -> Path:
    """A Debian minbase root filesystem with `packages`, as a tar (mmdebstrap, from Debian's mirror)."""
    argv = ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", "--quiet",
            *(f"--dpkgopt=path-exclude=/usr/share/{folder}/*" for folder in ("doc", "man", "locale", "info")),
            DEBIAN_SUITE]

    def build(scratch: Path) -> None:
        log(f"building a Debian {DEBIAN_SUITE} root filesystem with {', '.join(packages)} (once; a minute or two)")
        _run("debian rootfs", [*argv, str(scratch / "out.tar")])

    return _cached("debian", " ".join(argv), build)


def _runtime_sources() -> dict[str, Path]:
    """agentkube's files the sandbox image carries (archive name → file): the SDK and the node-agent
    package, whose runtime module needs only pydantic and typer at import."""
    import agentkube.client
    import agentkube.contract
    import agentkube.ebpf.runtime

    ebpf_dir = Path(agentkube.ebpf.runtime.__file__).parent
    files = {"agentkube/client.py": Path(agentkube.client.__file__), "agentkube/contract.py": Path(agentkube.contract.__file__)}
    files |= {f"agentkube/ebpf/{path.name}": path for path in sorted(ebpf_dir.glob("*.py"))}
    return files


def sandbox_archive(log=print) -> Path:
    base = layer(debian_rootfs(log=log))
    sources = _runtime_sources()
    key = json.dumps({"base": base.digest, "wheels": SANDBOX_WHEELS, "python": sys.version_info[:2],
                      "sources": {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sources.items()}})

    def build(scratch: Path) -> None:
        log("building the sandbox image")
        root = scratch / "rootfs"
        site = root / SITE_DIR
        # Offline from `make venv`'s wheels when they are there; from the package index otherwise.
        wheels = wheels_dir()
        source = ["--no-index", "--find-links", str(wheels)] if any(wheels.glob("*.whl")) else []
        _run("sandbox wheels", [sys.executable, "-m", "pip", "install", "--quiet", *source, "--target", str(site),
                                "--no-compile", *SANDBOX_WHEELS])
        for name, path in sources.items():
            (site / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, site / name)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter
        runtime = layer(tar_directory(root, scratch / "layer.tar"))
        config = {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"PYTHONPATH=/{SITE_DIR}",
                    "PYTHONDONTWRITEBYTECODE=1"],
            "Entrypoint": ["python3", "-m", "agentkube.ebpf.commands"],
            "WorkingDir": "/",
        }
        write_oci_archive(scratch / "out.tar", [base, runtime], config, SANDBOX_IMAGE)

    return _cached("sandbox", key, build)


def import_archive(ctr: Path, socket: Path, namespace: str, archive: Path) -> None:
    _run("image import", [str(ctr), "--address", str(socket), "--namespace", namespace, "images", "import", str(archive)])
