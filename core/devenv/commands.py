"""`agentkube dev ...`: the local environment from the command line."""

import shlex
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from agentkube.devenv.cluster import NODE_AGENT_MODES, DevEnv, DevEnvError, build_artifacts
from agentkube.devenv.images import ImageError
from agentkube.devenv.install import InstallError, install_all
from agentkube.devenv.knative import KnativeError
from agentkube.devenv.knative import watch_scrape_targets as knative_watch
from agentkube.devenv.localnode import NodeError
from agentkube.devenv.versions import bin_dir, default_state_dir

dev_app = typer.Typer(help="A real local control plane and Prometheus, for development and tests.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # soft wrap: printed commands stay copy-pasteable

StateDir = Annotated[
    Path,
    typer.Option("--state-dir", envvar="AGENTKUBE_DEV_DIR", help="Where the environment keeps its certs, data and logs."),
]


def _fail(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", highlight=False)
    raise typer.Exit(1)


@dev_app.command()
def install() -> None:
    """Build the control plane, unpack kubectl and helm, and build the images and programs of the node, Knative
    and Karpenter into the cache (each skipped when current), so that `dev up` and the tests start at once."""
    try:
        install_all(log=lambda message: console.print(message, highlight=False))
        build_artifacts(with_node=True, with_knative=True, with_capacity=True)
    except (InstallError, ImageError) as error:
        _fail(error)


@dev_app.command()
def up(
    state_dir: StateDir = default_state_dir(),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every component to be healthy.")] = 120.0,
    with_node: Annotated[bool, typer.Option("--with-node", help="Also run a node (containerd, runc, kubelet, "
                                            "kube-scheduler, the node agent) so that pods run; needs root.")] = False,
    with_knative: Annotated[bool, typer.Option("--with-knative", help="Also run Knative Serving (built here from "
                                               "its Go module) on the node; implies --with-node.")] = False,
    with_capacity: Annotated[bool, typer.Option("--with-capacity", help="Also run Karpenter (its KWOK provider) and "
                                                "kwok, built here, for simulated spot and on-demand nodes whose pods "
                                                "never run; implies --with-node.")] = False,
    node_agent: Annotated[str, typer.Option(
        "--node-agent", help="with --with-node: `host` runs the node agent as a host process; `none` runs none, "
        "for the chart's DaemonSet (one node agent per node)")] = "host",
) -> None:
    """Start etcd, kube-apiserver, kube-controller-manager and Prometheus on loopback (no-op when already up);
    with --with-node also a node whose pods run for real."""
    if node_agent not in NODE_AGENT_MODES:
        _fail(DevEnvError(f"--node-agent {node_agent}: one of {', '.join(NODE_AGENT_MODES)}"))
    env = DevEnv(state_dir, with_node=with_node, node_agent=node_agent, with_knative=with_knative,
                 with_capacity=with_capacity)
    if env.is_up():
        console.print(f"already up in {state_dir}")
    else:
        started = time.monotonic()
        try:
            env.up(timeout=timeout)
        except (InstallError, DevEnvError, ImageError, NodeError, KnativeError) as error:
            _fail(error)
        steps = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in env.startup_seconds.items())
        console.print(f"up in {time.monotonic() - started:.1f}s ({steps})")
        console.print(f"apiserver {env.apiserver_url}, prometheus {env.prometheus_url}")
    console.print(f"point kubectl at it with:  eval \"$(agentkube dev env --state-dir {shlex.quote(str(state_dir))})\"")


@dev_app.command()
def down(state_dir: StateDir = default_state_dir()) -> None:
    """Stop every process of the environment and delete its state directory."""
    try:
        DevEnv(state_dir).down()
    except DevEnvError as error:
        _fail(error)
    console.print(f"down: {state_dir} removed")


@dev_app.command("restart-apiserver")
def restart_apiserver(
    state_dir: StateDir = default_state_dir(),
    down_for: Annotated[float, typer.Option(help="Seconds to leave it stopped before starting it again.")] = 0.0,
) -> None:
    """Stop kube-apiserver and start it again on the same address and port (an outage its clients must ride out)."""
    env = DevEnv(state_dir)
    try:
        console.print(f"stopping kube-apiserver for {down_for:.0f}s")
        env.restart_apiserver(down_for=down_for)
    except (InstallError, DevEnvError) as error:
        _fail(error)
    console.print(f"kube-apiserver back at {env.apiserver_url}")


@dev_app.command()
def status(state_dir: StateDir = default_state_dir()) -> None:
    """Show each component and whether it is healthy; exits 1 unless all are."""
    env = DevEnv(state_dir)
    health = env.status()
    pids = {record.name: record.pid for record in env.processes}
    table = Table("component", "pid", "healthy")
    for name, healthy in health.items():
        table.add_row(name, str(pids.get(name, "-")), "[green]yes[/]" if healthy else "[red]no[/]")
    Console().print(table)
    if env.ports is not None:
        Console().print(f"apiserver {env.apiserver_url}\nprometheus {env.prometheus_url}\nkubeconfig {env.kubeconfig}")
    if not all(health.values()):
        raise typer.Exit(1)


@dev_app.command()
def env(state_dir: StateDir = default_state_dir()) -> None:
    """Print shell exports that point kubectl and helm at the environment: eval "$(agentkube dev env)"."""
    environment = DevEnv(state_dir)
    if environment.ports is None:
        _fail(DevEnvError(f"no environment in {state_dir}: run `agentkube dev up`"))
    print(f"export KUBECONFIG={shlex.quote(str(environment.kubeconfig))}")
    print(f'export PATH={shlex.quote(str(bin_dir()))}:"$PATH"')


@dev_app.command("knative-targets", hidden=True)
def knative_targets(state_dir: StateDir = default_state_dir()) -> None:
    """Keep Prometheus' target file for Knative's pods current (started by `up --with-knative`)."""
    environment = DevEnv(state_dir)
    knative_watch(environment.layout.client_kubeconfig("prometheus"),
                  environment.layout.scrape_targets / "knative.json")
