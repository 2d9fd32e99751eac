"""One distribution, one import root, importable from anywhere, never shadowing `operator`."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from agentkube.devenv.versions import KUBERNETES_VERSION

REPO = Path(__file__).resolve().parents[2]
COMPONENT_FOLDERS = ("core", "operator", "ebpf", "rl")
PROBE = (
    "import operator, agentkube.operator, agentkube.ebpf, agentkube.rl, agentkube.devenv, agentkube.cli;"
    "import sysconfig, pathlib;"
    "assert pathlib.Path(operator.__file__).parent == pathlib.Path(sysconfig.get_path('stdlib')), operator.__file__;"
    "assert operator.itemgetter(1)([0, 1]) == 1"
)


@pytest.mark.parametrize("cwd", [REPO, REPO / "operator", REPO / "tests", Path("/")], ids=["root", "operator", "tests", "slash"])
@pytest.mark.parametrize("flags", [[], ["-S"]], ids=["site", "no-site"])
def test_imports_from_any_directory_without_shadowing_operator(cwd, flags):
    if flags:  # without site, the package is found only through an explicit path
        site_packages = next(p for p in sys.path if p.endswith("site-packages"))
        probe = f"import sys, site; site.addsitedir({site_packages!r}); {PROBE}"
    else:
        probe = PROBE
    result = subprocess.run([sys.executable, *flags, "-c", probe], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_component_folders_are_not_regular_packages():
    # A regular package named `operator` in the working directory would replace the standard library's.
    for folder in COMPONENT_FOLDERS:
        assert not (REPO / folder / "__init__.py").exists(), folder
    assert not (REPO / "agentkube").exists()


def test_go_module_pins_kubernetes_and_every_staging_module():
    go_mod = (REPO / "hack" / "controlplane" / "go.mod").read_text()
    assert f"k8s.io/kubernetes {KUBERNETES_VERSION}" in go_mod
    staging_version = "v0." + KUBERNETES_VERSION.removeprefix("v1.")
    replaced = dict(re.findall(r"^\s*(k8s\.io/\S+) => k8s\.io/\S+ (\S+)$", go_mod, re.MULTILINE))
    assert replaced, "no replace lines"
    assert set(replaced.values()) == {staging_version}
    # Every k8s.io module the build resolves at the placeholder v0.0.0 must be replaced.
    required = set(re.findall(r"^\s*(k8s\.io/\S+) v0\.0\.0(?:\s|$)", go_mod, re.MULTILINE))
    assert required <= set(replaced)


def test_a_normal_wheel_install_imports_from_any_directory(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheel_dir), str(REPO)], check=True)
    wheel = next(wheel_dir.glob("agentkube-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)], check=True)
    # The base interpreter does not load this venv's editable finder; dependencies come from the venv.
    dependencies = next(p for p in sys.path if p.endswith("site-packages"))
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    for cwd in (REPO, tmp_path):
        result = subprocess.run(
            [str(base_python), "-c", PROBE + "; import agentkube; assert str(agentkube.__path__[0]).startswith(" + repr(str(target)) + ")"],
            cwd=cwd, env={"PYTHONPATH": f"{target}:{dependencies}"}, capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr
