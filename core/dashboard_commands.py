"""`agentkube dashboards`: write the Grafana dashboards' JSON into the chart, and render them to PNG from
a Prometheus (the demo's, or any)."""

from pathlib import Path

import typer

dashboards_app = typer.Typer(help="The Grafana dashboards: generate their JSON, render them to PNG.", no_args_is_help=True)


@dashboards_app.command("generate")
def generate(out: Path = typer.Option(None, help="Directory (default: the chart's dashboards/).")) -> None:
    """Write every dashboard's JSON (grafana-foundation-sdk) where the chart ships it."""
    from agentkube import dashboards

    for path in dashboards.write(out or dashboards.DASHBOARD_DIRECTORY):
        typer.echo(path)


@dashboards_app.command("render")
def render(
    prometheus: str = typer.Option(..., help="Prometheus URL, e.g. http://127.0.0.1:9090"),
    out: Path = typer.Option(Path("docs/dashboards"), help="Directory for the PNGs."),
    minutes: float = typer.Option(15.0, help="How far back each panel reaches."),
) -> None:
    """Draw each dashboard to a PNG from the same queries its panels run (query_range)."""
    from agentkube import dashboards

    for dashboard in dashboards.DASHBOARDS:
        typer.echo(dashboards.render_png(dashboard, prometheus, out, minutes=minutes))
