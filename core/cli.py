"""The `agentkube` command line. Each concern contributes its own sub-command group."""

import importlib
from importlib.metadata import version as package_version
from pathlib import Path

import typer
import typer.core
import typer.main

# Each concern's group, imported only when it is the one invoked: a process runs one of them, and each pulls in
# its component (the operator Kopf, the dev environment cryptography, the node agent gRPC and BCC's helpers).
# Imported all at once, they were ~33 MiB of the operator pod's resident memory that it never used
# (`python -X importtime`; bench/sandbox_scale.py, operator/README.md "Memory").
GROUPS = {
    "dev": ("agentkube.devenv.commands", "dev_app"),
    "operator": ("agentkube.operator.commands", "operator_app"),
    "crds": ("agentkube.operator.commands", "crds_app"),
    "capacity": ("agentkube.operator.commands", "capacity_app"),
    "rl": ("agentkube.rl.cli", "rl_app"),
    "node-agent": ("agentkube.ebpf.commands", "node_agent_app"),
    "sandbox-runtime": ("agentkube.ebpf.commands", "sandbox_runtime_app"),
    "dashboards": ("agentkube.dashboard_commands", "dashboards_app"),
}


class LazyGroups(typer.core.TyperGroup):
    """The top-level group: the commands declared here, and the GROUPS, each loaded when first asked for.
    (Typer's click is its own vendored copy, whose types it does not export: hence no annotations.)"""

    def list_commands(self, ctx):
        return [*GROUPS, *super().list_commands(ctx)]

    def get_command(self, ctx, cmd_name):
        if cmd_name not in GROUPS:
            return super().get_command(ctx, cmd_name)
        module, attribute = GROUPS[cmd_name]
        command = typer.main.get_group(getattr(importlib.import_module(module), attribute))
        command.name = cmd_name
        return command


app = typer.Typer(
    cls=LazyGroups,
    name="agentkube",
    help="Kubernetes operator for AI-agent sandboxes and RL-autoscaled model serving.",
    no_args_is_help=True,
    add_completion=False,
)
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
    state_dir: Path | None = typer.Option(None, "--state-dir", envvar="AGENTKUBE_DEV_DIR", show_default=False,
                                          help="The local environment's directory (the one `agentkube dev` uses; "
                                               "default: $XDG_STATE_HOME or ~/.local/state, then agentkube/dev)."),
    quick: bool = typer.Option(False, "--quick", help="One call of each kind (what the test suite runs)."),
) -> None:
    """agentkube's main job on the local cluster: install it with Helm, run an agent in a sandbox, summarize."""
    from agentkube.demo import main
    from agentkube.devenv.versions import default_state_dir

    raise typer.Exit(main(state_dir or default_state_dir(), quick))


@app.command()
def version() -> None:
    """Print the agentkube version."""
    typer.echo(package_version("agentkube"))
