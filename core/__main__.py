from agentkube.cli import app

app(prog_name="agentkube")
