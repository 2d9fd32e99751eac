"""`agentkube operator ...` and `agentkube crds ...`."""

from pathlib import Path
from typing import Annotated

import typer

from agentkube.operator import crds, main, shards

operator_app = typer.Typer(help="The Kopf operator for AgentSandbox and ServedModel.", no_args_is_help=True)
capacity_app = typer.Typer(help="Spot capacity: play what a cloud does to spot nodes (tests, the demo).",
                            no_args_is_help=True)
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
    shard: Annotated[str, typer.Option(
        envvar="AGENTKUBE_SHARD",
        help="I/N: reconcile only the sandboxes of the namespaces that hash to shard I of N, peering under "
             "PEERING-shard-I; ServedModels only on shard 0. 0/1: everything, one peering group.")] = "0/1",
) -> None:
    """Run the operator against the current kubeconfig (an existing cluster or `agentkube dev`)."""
    try:
        part = shards.Shard.parse(shard)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--shard") from None
    main.run(metrics_address=metrics_address, metrics_port=metrics_port, liveness_port=liveness_port,
             peering=peering or None, namespace=namespace, prometheus_url=prometheus_url or None,
             runtime_key_file=runtime_key_file, gateway_namespace=gateway_namespace, node_class=node_class, shard=part)


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


@capacity_app.command("interrupt")
def interrupt(
    node: Annotated[str, typer.Argument(help="A spot node that Karpenter launched.")],
    notice: Annotated[float, typer.Option(min=0, help="Seconds between the notice and the NodeClaim's deletion "
                                          "(AWS gives 120).")] = 120.0,
) -> None:
    """A spot interruption as AWS gives it: the notice (the Node Termination Handler's `spot-itn` taint),
    then, `notice` seconds later, the node's NodeClaim deleted (Karpenter then drains and removes it)."""
    import time

    from agentkube.operator import capacity, interruptions, kube

    try:
        found = kube.request("GET", kube.cluster_path("v1", "nodes", node))
    except kube.ApiException as error:
        typer.echo(f"node {node}: {error.reason}", err=True)
        raise typer.Exit(2) from None
    if (found["metadata"].get("labels") or {}).get(capacity.CAPACITY_TYPE_LABEL) != capacity.SPOT:
        typer.echo(f"node {node} is not a spot node ({capacity.CAPACITY_TYPE_LABEL} is not {capacity.SPOT})", err=True)
        raise typer.Exit(2)
    nodeclaims = kube.cluster_path(kube.KARPENTER_GROUP_VERSION, capacity.NODECLAIMS)
    claim = interruptions.nodeclaim_of(kube.list_at(nodeclaims), node)
    if claim is None:
        typer.echo(f"node {node} has no NodeClaim", err=True)
        raise typer.Exit(2)
    taints = interruptions.notice_taints((found.get("spec") or {}).get("taints") or [])
    if taints is not None:
        kube.request("PATCH", kube.cluster_path("v1", "nodes", node), {"spec": {"taints": taints}}, kube.MERGE_PATCH)
    typer.echo(f"interruption notice on {node}; NodeClaim {claim['metadata']['name']} goes in {notice:g}s")
    time.sleep(notice)
    kube.delete_at(kube.cluster_path(kube.KARPENTER_GROUP_VERSION, capacity.NODECLAIMS, claim["metadata"]["name"]))
    typer.echo(f"NodeClaim {claim['metadata']['name']} deleted: Karpenter drains {node} and removes it")
