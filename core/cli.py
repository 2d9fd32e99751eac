"""The `agentkube` command line. Each concern contributes its own sub-command group."""

from importlib.metadata import version as package_version

import typer

from agentkube.dashboard_commands import dashboards_app
from agentkube.devenv.commands import dev_app
from agentkube.ebpf.commands import node_agent_app, sandbox_runtime_app
from agentkube.operator.commands import crds_app, operator_app
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
app.add_typer(rl_app, name="rl")
app.add_typer(node_agent_app, name="node-agent")
app.add_typer(sandbox_runtime_app, name="sandbox-runtime")
app.add_typer(dashboards_app, name="dashboards")


@app.command()
def version() -> None:
    """Print the agentkube version."""
    typer.echo(package_version("agentkube"))
