"""The `agentkube` command line. Each concern contributes its own sub-command group."""

from importlib.metadata import version as package_version
from pathlib import Path

import typer

from agentkube.dashboard_commands import dashboards_app
from agentkube.devenv.commands import dev_app
from agentkube.devenv.versions import default_state_dir
from agentkube.ebpf.commands import node_agent_app, sandbox_runtime_app
from agentkube.operator.commands import capacity_app, crds_app, operator_app
from agentkube.rl.cli import rl_app

app = typer.Typer(
    name="agentkube",
    help="Kubernetes operator for AI-agent sandboxes and RL-autoscaled model serving.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(dev_app, name="dev")
app.add_typer(operator_app, name="operator")
app.add_typer(crds_app, name="crds")
app.add_typer(capacity_app, name="capacity")
app.add_typer(rl_app, name="rl")
app.add_typer(node_agent_app, name="node-agent")
app.add_typer(sandbox_runtime_app, name="sandbox-runtime")
app.add_typer(dashboards_app, name="dashboards")
gateway_app = typer.Typer(help="The gateway: authenticated, streaming access to sandboxes from anywhere.",
                          no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")


@gateway_app.command("run")
def run_gateway(
    runtime_key_file: Path = typer.Option(..., envvar="AGENTKUBE_RUNTIME_KEY_FILE",
                                          help="the key shared with the operator (the chart's Secret)"),
    address: str = typer.Option("0.0.0.0", help="where it listens"),
    port: int = typer.Option(8080, help="its HTTP port"),
    kubeconfig: str | None = typer.Option(None, help="credentials (default: in-cluster)"),
    tls_cert_file: Path | None = typer.Option(None, help="serve HTTPS with this certificate (PEM; with --tls-key-file)"),
    tls_key_file: Path | None = typer.Option(None, help="the certificate's private key (PEM)"),
    runtime_port: int = typer.Option(7070, help="the sandbox runtimes' TCP port (what the operator gives their pods)"),
    watch_sandboxes: bool = typer.Option(True, envvar="AGENTKUBE_GATEWAY_WATCH_SANDBOXES",
                                         help="keep a watch of every AgentSandbox, so that a call to a running one "
                                         "reads nothing from the API server (list and watch on agentsandboxes)"),
) -> None:
    """Serve sandbox calls: TokenReview + SubjectAccessReview on each, then the sandbox's runtime."""
    from agentkube.gateway import serve

    serve(address=address, port=port, runtime_key_file=runtime_key_file, kubeconfig=kubeconfig,
          tls_cert_file=tls_cert_file, tls_key_file=tls_key_file, runtime_port=runtime_port,
          watch_sandboxes=watch_sandboxes)


@app.command()
def demo(
    state_dir: Path = typer.Option(default_state_dir(), "--state-dir", envvar="AGENTKUBE_DEV_DIR",
                                   help="The local environment's directory (the one `agentkube dev` uses)."),
    quick: bool = typer.Option(False, "--quick", help="One call of each kind (what the test suite runs)."),
) -> None:
    """agentkube's main job on the local cluster: install it with Helm, run an agent in a sandbox, summarize."""
    from agentkube.demo import main

    raise typer.Exit(main(state_dir, quick))


@app.command()
def version() -> None:
    """Print the agentkube version."""
    typer.echo(package_version("agentkube"))
