"""`agentkube operator ...` and `agentkube crds ...`."""

from pathlib import Path
from typing import Annotated

import typer

from agentkube.operator import crds, main

operator_app = typer.Typer(help="The Kopf operator for AgentSandbox and ServedModel.", no_args_is_help=True)
crds_app = typer.Typer(help="The CustomResourceDefinitions, generated from the API models.", no_args_is_help=True)


@operator_app.command()
def run(
    namespace: Annotated[str | None, typer.Option(help="Watch one namespace only (default: all).")] = None,
    metrics_address: Annotated[str, typer.Option(help="Address of the metrics and liveness endpoints.")] = "127.0.0.1",
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: off).")] = 8080,
    liveness_port: Annotated[int, typer.Option(help="Liveness probe port, /healthz (0: off).")] = 8081,
    peering: Annotated[str | None, typer.Option(
        help="ClusterKopfPeering name, so that one replica is active; '' to run standalone.")] = main.PEERING_NAME,
    prometheus_url: Annotated[str | None, typer.Option(
        envvar="AGENTKUBE_PROMETHEUS_URL",
        help="Prometheus that scrapes Knative's metrics, for ServedModels with autoscaling policy ppo "
             "(unset: they run Knative's default target, with a condition saying why).")] = None,
    runtime_key_file: Annotated[Path | None, typer.Option(
        envvar="AGENTKUBE_RUNTIME_KEY_FILE",
        help="The key shared with the gateway (the chart's Secret): sandbox runtimes then serve the gateway, "
             "each with a token derived from it (unset: they serve only their unix socket on the node).")] = None,
    gateway_namespace: Annotated[str | None, typer.Option(
        envvar="AGENTKUBE_GATEWAY_NAMESPACE",
        help="The gateway's namespace: only its pods there may reach sandbox runtimes' port.")] = None,
    node_class: Annotated[str | None, typer.Option(
        envvar="AGENTKUBE_NODE_CLASS",
        help="The Karpenter node class the NodePools of spot-enabled ServedModels name, as group/Kind/name "
             "(e.g. karpenter.k8s.aws/EC2NodeClass/default; unset: karpenter.kwok.sh/KWOKNodeClass/default, "
             "as `agentkube dev up --with-capacity` makes it).")] = None,
) -> None:
    """Run the operator against the current kubeconfig (an existing cluster or `agentkube dev`)."""
    main.run(metrics_address=metrics_address, metrics_port=metrics_port, liveness_port=liveness_port,
             peering=peering or None, namespace=namespace, prometheus_url=prometheus_url or None,
             runtime_key_file=runtime_key_file, gateway_namespace=gateway_namespace, node_class=node_class)


@crds_app.command()
def generate(
    check: Annotated[bool, typer.Option(help="Only report (exit 1) when the files differ from the models.")] = False,
) -> None:
    """Write crds/*.yaml and the chart's copies from the pydantic models (the one source of truth)."""
    if check:
        stale = crds.stale()
        for path in stale:
            typer.echo(f"stale: {path}")
        raise typer.Exit(1 if stale else 0)
    for path in crds.write_all():
        typer.echo(f"wrote {path}")
