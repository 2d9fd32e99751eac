"""Container images without a registry: made here from Debian's packages and imported into containerd.

- `pause`: the pod sandbox's process, compiled statically from hack/images/pause.c.
- `sandbox`: Debian (minbase) with Python 3, plus agentkube's sandbox runtime and SDK and the few wheels
  they need; its entry point is the sandbox runtime.
- `operator` and `node-agent`, what the chart runs: the same Debian layer, then one layer with agentkube and
  its runtime dependencies (from the offline wheel cache) that both share; the node agent's image adds a
  layer with BCC (`python3-bpfcc`) and iproute2 from Debian, which the operator does without. Their names
  and tag come from the chart (values.yaml's repositories, Chart.yaml's appVersion), the one source.

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
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from agentkube.devenv.versions import cache_root, wheels_dir

PAUSE_IMAGE = "localhost/agentkube/pause:dev"
SANDBOX_IMAGE = "localhost/agentkube/sandbox:dev"
MODEL_SERVER_IMAGE = "dev.local/agentkube/model-server:dev"
DEBIAN_SUITE = "bookworm"
# The sandbox image's Debian packages: Python for the runtime and the agent's own tools.
SANDBOX_PACKAGES = ("python3",)
# Wheels the runtime imports (installed from the same offline wheel cache as the project's venv).
SANDBOX_WHEELS = ("pydantic", "typer", "prometheus-client")
SITE_DIR = "opt/agentkube/lib"
# The runtime's warm-pool held program (ebpf/programs/held.c), compiled statically into the sandbox image.
HELD_PATH = "opt/agentkube/bin/agentkube-held"
# What only the node agent needs from Debian: BCC (its programs compile at start against the host's kernel
# headers, mounted by the DaemonSet) and `ip`, with which it puts the DNS answering's address on a link.
NODE_AGENT_PACKAGES = ("python3-bpfcc", "iproute2")
# The checkout the chart and the package's sources are read from (images are built from a checkout).
REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "agentkube"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The user the chart runs the operator as (runAsUser), named in /etc/passwd and /etc/group as distroless
# images name it: Python's getpass.getuser() (which Kopf calls for its peering identity) fails without.
NONROOT_UID, NONROOT_NAME = 65532, "nonroot"
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


def tar_difference(base: Path, full: Path, target: Path) -> Path:
    """A layer that turns the root filesystem `base` into `full` (both tars): every member `full` lacks in
    `base` or holds differently, and a whiteout for every one it no longer has. Deterministic like
    `tar_directory`. A hard link whose target is not in the layer becomes a copy (a link may not reach into
    a lower layer)."""
    def signature(archive: tarfile.TarFile, member: tarfile.TarInfo) -> tuple:
        content = ""
        if member.isfile() or member.islnk():
            handle = archive.extractfile(member)
            content = hashlib.sha256(handle.read() if handle else b"").hexdigest()
        return (member.type if not member.islnk() else tarfile.REGTYPE, member.mode, member.uid, member.gid,
                member.linkname if member.issym() else "", content)

    with tarfile.open(base) as lower:
        known = {_member_path(member.name): signature(lower, member) for member in lower}
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(full) as upper, tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as out:
        members = {_member_path(member.name): member for member in upper}
        changed = sorted(name for name, member in members.items() if known.get(name) != signature(upper, member))
        in_layer = set(changed)
        for name in changed:
            member = upper.getmember(members[name].name)
            info = _normalise(tarfile.TarInfo(name))
            info.type, info.mode, info.uid, info.gid = member.type, member.mode, member.uid, member.gid
            if member.islnk() and _member_path(member.linkname) not in in_layer:
                info.type = tarfile.REGTYPE
            if info.type == tarfile.REGTYPE:
                data = (upper.extractfile(member) or io.BytesIO()).read()
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
            else:
                info.linkname = _member_path(member.linkname) if member.islnk() else member.linkname
                info.devmajor, info.devminor = member.devmajor, member.devminor
                out.addfile(info)
        for name in sorted(set(known) - set(members)):
            parent, _, leaf = name.rpartition("/")
            out.addfile(_normalise(tarfile.TarInfo(f"{parent}/.wh.{leaf}" if parent else f".wh.{leaf}")))
    partial.replace(target)
    return target


def _member_path(name: str) -> str:
    """A tar member's path as a layer names it (mmdebstrap writes `./usr/...`)."""
    return name.removeprefix("./").rstrip("/") or "."


def _run(step: str, argv: list[str], **kwargs) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise ImageError(f"{step}: `{' '.join(argv)}` failed:\n{(result.stderr or result.stdout)[-3000:]}")


# Products of one name kept in the cache: the most recently used. More than one, so that checkouts of
# different sources on one machine (a branch beside main, a CI clone) do not delete each other's archive
# while it is in use; few, since each sandbox archive is ~180 MB and every source change makes a new one.
CACHED_PRODUCTS_KEPT = 6


def cached_build(name: str, key: str, build: Callable[[Path], None]) -> Path:
    """A build product in the image cache, rebuilt only when `key` (what it is made from) changes; beyond
    the CACHED_PRODUCTS_KEPT most recently used of its name, older products go."""
    target = images_cache() / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.tar"
    if target.is_file():
        target.touch()  # used: the last to go
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        build(Path(scratch))
        (Path(scratch) / "out.tar").replace(target)
    products = sorted(target.parent.glob(f"{name}-*.tar"), key=_mtime_or_zero, reverse=True)
    for older in products[CACHED_PRODUCTS_KEPT:]:
        older.unlink(missing_ok=True)
    return target


def _mtime_or_zero(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:  # removed meanwhile by another checkout's build
        return 0.0


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

    return cached_build("pause", hashlib.sha256(program).hexdigest(), build)


def _mmdebstrap_argv(packages: tuple[str, ...]) -> list[str]:
    return ["mmdebstrap", "--variant=minbase", f"--include={','.join(packages)}", "--quiet",
            *(f"--dpkgopt=path-exclude=/usr/share/{folder}/*" for folder in ("doc", "man", "locale", "info")),
            DEBIAN_SUITE]


def debian_rootfs(packages: tuple[str, ...] = SANDBOX_PACKAGES, log=print) -> Path:
    """A Debian minbase root filesystem with `packages`, as a tar (mmdebstrap, from Debian's mirror)."""
    argv = _mmdebstrap_argv(packages)

    def build(scratch: Path) -> None:
        log(f"building a Debian {DEBIAN_SUITE} root filesystem with {', '.join(packages)} (once; a minute or two)")
        _run("debian rootfs", [*argv, str(scratch / "out.tar")])

    return cached_build("debian", " ".join(argv), build)


def _runtime_sources() -> dict[str, Path]:
    """agentkube's files the sandbox image carries (archive name → file): the SDK and the node-agent
    package, whose runtime module needs only pydantic and typer at import."""
    import agentkube.client
    import agentkube.contract
    import agentkube.ebpf.runtime

    ebpf_dir = Path(agentkube.ebpf.runtime.__file__).parent
    files = {"agentkube/client.py": Path(agentkube.client.__file__), "agentkube/contract.py": Path(agentkube.contract.__file__)}
    files |= {f"agentkube/ebpf/{path.name}": path for path in sorted(ebpf_dir.glob("*.py"))}
    files["agentkube/ebpf/programs/held.c"] = ebpf_dir / "programs" / "held.c"  # compiled into HELD_PATH too
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
        (root / HELD_PATH).parent.mkdir(parents=True, exist_ok=True)
        _run("held program", ["cc", "-static", "-O2", "-o", str(root / HELD_PATH), str(sources["agentkube/ebpf/programs/held.c"])])
        runtime = layer(tar_directory(root, scratch / "layer.tar"))
        config = {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"PYTHONPATH=/{SITE_DIR}",
                    "PYTHONDONTWRITEBYTECODE=1", f"AGENTKUBE_HELD=/{HELD_PATH}"],
            "Entrypoint": ["python3", "-m", "agentkube.ebpf.commands"],
            "WorkingDir": "/",
        }
        write_oci_archive(scratch / "out.tar", [base, runtime], config, SANDBOX_IMAGE)

    return cached_build("sandbox", key, build)


def chart_images(chart: dict[str, Any], values: dict[str, Any]) -> dict[str, str]:
    """The images the chart runs (component → reference), from its Chart.yaml and values.yaml: each
    repository as values.yaml names it, tagged with the chart's appVersion, as the chart's templates
    default the tag."""
    return {component: f"{values[key]['image']['repository']}:{values[key]['image'].get('tag') or chart['appVersion']}"
            for component, key in (("operator", "operator"), ("node-agent", "nodeAgent"))}


def read_chart_images(chart_dir: Path = CHART_DIR) -> dict[str, str]:
    return chart_images(yaml.safe_load((chart_dir / "Chart.yaml").read_text()),
                        yaml.safe_load((chart_dir / "values.yaml").read_text()))


def package_sources(pyproject: dict[str, Any], root: Path) -> dict[str, Path]:
    """agentkube's files as a wheel holds them (archive name → file in the checkout): each package's
    modules and package data, found through pyproject's package-dir mapping."""
    setuptools = pyproject["tool"]["setuptools"]
    mapping, data = setuptools["package-dir"], setuptools.get("package-data", {})
    files: dict[str, Path] = {}
    for package in setuptools["packages"]:
        owner = max((name for name in mapping if package == name or package.startswith(name + ".")), key=len)
        folder = root / mapping[owner] / Path(*package.split(".")[len(owner.split(".")):])
        patterns = ["*.py", *data.get("*", []), *data.get(package, [])]
        for pattern in patterns:
            for path in sorted(folder.glob(pattern)):
                files[str(Path(*package.split("."), path.relative_to(folder)))] = path
    return files


def _wheel_source() -> list[str]:
    """pip's arguments for the wheels: offline from `make venv`'s cache when it is there."""
    wheels = wheels_dir()
    return ["--no-index", "--find-links", str(wheels)] if any(wheels.glob("*.whl")) else []


def with_nonroot_user(passwd: str, group: str) -> tuple[str, str]:
    """The base's /etc/passwd and /etc/group with the NONROOT user and group appended."""
    return (passwd.rstrip("\n") + f"\n{NONROOT_NAME}:x:{NONROOT_UID}:{NONROOT_UID}:{NONROOT_NAME}:/nonexistent:/usr/sbin/nologin\n",
            group.rstrip("\n") + f"\n{NONROOT_NAME}:x:{NONROOT_UID}:\n")


def _base_file(base: Path, name: str) -> str:
    with tarfile.open(base) as archive:
        handle = archive.extractfile(f"./{name}")
        return handle.read().decode() if handle else ""


def agentkube_layer(log=print) -> Layer:
    """/opt/agentkube/lib: agentkube and its runtime dependencies (not the test or training extras), and
    the non-root user the chart runs it as."""
    base = debian_rootfs(log=log)
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    sources = package_sources(pyproject, REPO_ROOT)
    requirements = pyproject["project"]["dependencies"]
    key = json.dumps({"base": _sha256_file(base), "user": [NONROOT_UID, NONROOT_NAME],
                      "requirements": requirements, "python": sys.version_info[:2],
                      "wheels": sorted(path.name for path in wheels_dir().glob("*.whl")),
                      "sources": {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in sources.items()}})

    def build(scratch: Path) -> None:
        log("building the agentkube layer (agentkube and its runtime dependencies)")
        root = scratch / "rootfs"
        site = root / SITE_DIR
        _run("agentkube wheels", [sys.executable, "-m", "pip", "install", "--quiet", *_wheel_source(),
                                  "--target", str(site), "--no-compile", *requirements])
        for name, path in sources.items():
            (site / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, site / name)
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with this machine's interpreter
        passwd, group = with_nonroot_user(_base_file(base, "etc/passwd"), _base_file(base, "etc/group"))
        (root / "etc").mkdir()
        (root / "etc" / "passwd").write_text(passwd)
        (root / "etc" / "group").write_text(group)
        tar_directory(root, scratch / "out.tar")

    return layer(cached_build("agentkube-layer", key, build))


def node_agent_layer(log=print) -> Layer:
    """What the node agent's image adds to the Debian layer: BCC and iproute2, as a difference of two
    root filesystems (the packages' files and dpkg's records of them)."""
    base = debian_rootfs(log=log)
    argv = _mmdebstrap_argv((*SANDBOX_PACKAGES, *NODE_AGENT_PACKAGES))
    key = json.dumps({"base": _sha256_file(base), "argv": argv})

    def build(scratch: Path) -> None:
        log(f"building a Debian root filesystem with {', '.join(NODE_AGENT_PACKAGES)} (once; a minute or two)")
        _run("node-agent rootfs", [*argv, str(scratch / "full.tar")])
        tar_difference(base, scratch / "full.tar", scratch / "out.tar")

    return layer(cached_build("bcc-layer", key, build))


def _component_config(entrypoint_args: list[str]) -> dict[str, Any]:
    return {"Env": [PATH_ENV, f"PYTHONPATH=/{SITE_DIR}", "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"],
            "Entrypoint": ["python3", "-m", "agentkube", *entrypoint_args], "WorkingDir": "/"}


def component_archives(log=print) -> list[Path]:
    """The operator's and the node agent's images, as the chart names them. Layers are shared in this
    order (Debian, agentkube, then BCC), so containerd stores the first two once."""
    references = read_chart_images()
    base = layer(debian_rootfs(log=log))
    agentkube = agentkube_layer(log=log)
    bcc = node_agent_layer(log=log)
    archives = []
    for component, layers in (("operator", [base, agentkube]), ("node-agent", [base, agentkube, bcc])):
        reference = references[component]
        key = json.dumps({"layers": [item.digest for item in layers], "reference": reference})

        def build(scratch: Path, layers: list[Layer] = layers, reference: str = reference) -> None:
            write_oci_archive(scratch / "out.tar", layers, _component_config([]), reference)

        archives.append(cached_build(component, key, build))
    return archives


def model_server_archive(log=print) -> Path:
    """The emulated LLM server (`agentkube.modelserver`) that ServedModels run on the local node: the
    operator's layers with the server as entry point. Named under `dev.local` so that Knative serves it
    without resolving a digest from a registry."""
    layers = [layer(debian_rootfs(log=log)), agentkube_layer(log=log)]
    key = json.dumps({"layers": [item.digest for item in layers], "reference": MODEL_SERVER_IMAGE})

    def build(scratch: Path) -> None:
        config = _component_config([]) | {"Entrypoint": ["python3", "-m", "agentkube.modelserver"],
                                          "User": f"{NONROOT_UID}:{NONROOT_UID}"}
        write_oci_archive(scratch / "out.tar", layers, config, MODEL_SERVER_IMAGE)

    return cached_build("model-server", key, build)


def layer_sizes(archive: Path) -> list[int]:
    """Bytes of each of an image's layers (uncompressed tars), from its manifest."""
    with tarfile.open(archive) as handle:
        def blob(digest: str) -> dict[str, Any]:
            return json.load(handle.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}"))  # type: ignore[arg-type]

        index = json.load(handle.extractfile("index.json"))  # type: ignore[arg-type]
        return [item["size"] for item in blob(index["manifests"][0]["digest"])["layers"]]


def import_archive(ctr: Path, socket: Path, namespace: str, archive: Path) -> None:
    _run("image import", [str(ctr), "--address", str(socket), "--namespace", namespace, "images", "import", str(archive)])
