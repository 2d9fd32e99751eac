"""Clear errors from the command line when something is missing."""

import pytest
from typer.testing import CliRunner

from agentkube.cli import app
from agentkube.devenv.install import InstallError, require_binary

runner = CliRunner()


def test_env_and_status_without_an_environment_say_how_to_start_one(tmp_path):
    for command in ("env", "status"):
        result = runner.invoke(app, ["dev", command, "--state-dir", str(tmp_path / "none")])
        assert result.exit_code == 1
    result = runner.invoke(app, ["dev", "env", "--state-dir", str(tmp_path / "none")])
    assert "agentkube dev up" in result.output


def test_missing_control_plane_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKUBE_CACHE", str(tmp_path))
    with pytest.raises(InstallError, match="agentkube dev install"):
        require_binary("kube-apiserver")


def test_missing_debian_tool_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKUBE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(InstallError, match="make deps"):
        require_binary("prometheus")


def test_up_without_binaries_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENTKUBE_CACHE", str(tmp_path / "cache"))
    state = tmp_path / "state"
    result = runner.invoke(app, ["dev", "up", "--state-dir", str(state)])
    assert result.exit_code == 1
    assert "agentkube dev install" in result.output
    assert not state.exists()


def test_a_directory_that_is_not_an_environment_is_never_used_or_deleted(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    for command in ("up", "down"):
        result = runner.invoke(app, ["dev", command, "--state-dir", str(tmp_path)])
        assert result.exit_code == 1
        assert "refusing" in result.output
    assert precious.read_text() == "keep me"
