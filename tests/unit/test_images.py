"""The images' pure parts: names from the chart, the package's files, layer differences, node-agent modes."""

import io
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from agentkube.devenv import cluster, images


def test_images_are_named_by_the_charts_values_and_tagged_with_its_app_version():
    chart = yaml.safe_load((images.CHART_DIR / "Chart.yaml").read_text())
    references = images.read_chart_images()
    assert references == {"operator": f"localhost/agentkube/operator:{chart['appVersion']}",
                          "node-agent": f"localhost/agentkube/node-agent:{chart['appVersion']}"}
    values = {"operator": {"image": {"repository": "r/op", "tag": "x"}}, "nodeAgent": {"image": {"repository": "r/na"}}}
    assert images.chart_images({"appVersion": "9"}, values) == {"operator": "r/op:x", "node-agent": "r/na:9"}


def test_the_package_layer_holds_every_module_and_package_data_file_a_wheel_would():
    pyproject = tomllib.loads((images.REPO_ROOT / "pyproject.toml").read_text())
    files = images.package_sources(pyproject, images.REPO_ROOT)
    for name in ("agentkube/cli.py", "agentkube/operator/main.py", "agentkube/ebpf/agent.py",
                 "agentkube/ebpf/programs/nodeagent.c", "agentkube/rl/policies/ppo_default.npz", "agentkube/py.typed"):
        assert name in files and files[name].is_file()
    assert not any(name.startswith(("tests/", "agentkube/tests")) for name in files)


def _tar(path: Path, members: dict[str, bytes | None]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
            else:
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def test_a_layer_difference_holds_what_changed_and_whites_out_what_went(tmp_path):
    base = _tar(tmp_path / "base.tar", {"./etc": None, "./etc/kept": b"same", "./etc/changed": b"old", "./etc/gone": b"x"})
    full = _tar(tmp_path / "full.tar", {"./etc": None, "./etc/kept": b"same", "./etc/changed": b"new", "./etc/added": b"+"})
    layer = images.tar_difference(base, full, tmp_path / "layer.tar")
    with tarfile.open(layer) as archive:
        names = archive.getnames()
        assert names == ["etc/added", "etc/changed", "etc/.wh.gone"]
        assert archive.extractfile("etc/changed").read() == b"new"  # type: ignore[union-attr]
    again = images.tar_difference(base, full, tmp_path / "again.tar")
    assert again.read_bytes() == layer.read_bytes(), "deterministic"


def test_the_node_agent_runs_on_the_host_by_default_or_not_at_all():
    assert "node-agent" in {c.name for c in cluster.node_components("host")}
    assert "node-agent" not in {c.name for c in cluster.node_components("none")}
    assert [c.name for c in cluster.node_components("none")] == [c.name for c in cluster.NODE if c.name != "node-agent"]
    with pytest.raises(ValueError):
        cluster.node_components("daemonset")


def test_the_nonroot_user_is_added_to_the_bases_accounts():
    passwd, group = images.with_nonroot_user("root:x:0:0:root:/root:/bin/bash\n", "root:x:0:\n")
    assert passwd.splitlines() == ["root:x:0:0:root:/root:/bin/bash",
                                   "nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin"]
    assert group.splitlines() == ["root:x:0:", "nonroot:x:65532:"]


def test_the_image_cache_keeps_the_most_recently_used_products_of_each_name(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "images_cache", lambda: tmp_path)
    built = []

    def build(key):
        def make(scratch: Path) -> None:
            built.append(key)
            (scratch / "out.tar").write_text(key)
        return make

    first = images.cached_build("sandbox", "k0", build("k0"))
    for i in range(1, images.CACHED_PRODUCTS_KEPT + 2):
        images.cached_build("sandbox", f"k{i}", build(f"k{i}"))
        images.cached_build("sandbox", "k0", build("k0"))  # another checkout keeps using its own product
    assert built.count("k0") == 1 and first.is_file()  # in use: never rebuilt, never removed
    assert len(list(tmp_path.glob("sandbox-*.tar"))) == images.CACHED_PRODUCTS_KEPT
    assert images.cached_build("pause", "p", build("p")).read_text() == "p"  # other names are counted apart
