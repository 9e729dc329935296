"""`distmlp plot`: loss and accuracy curves of a run directory."""

from typing import Annotated

import typer

from distmlp import metrics
from distmlp.cli.app import app, user_errors


@app.command()
@user_errors
def plot(
    run_dir: Annotated[str, typer.Argument(metavar="RUN_DIR", help="A run directory, path or URI (with "
                                           "metrics.parquet or metrics.jsonl, or metrics/ parts).")],
    out: Annotated[str, typer.Option("--out", "-o", help="The PNG to write.")] = "curves.png",
):
    """Plot train / held-out loss and held-out accuracy against step to a PNG.

    Needs matplotlib: pip install 'distmlp[plot]'.

    Example: distmlp plot runs/20260101-120000-quickstart -o curves.png
    """
    typer.echo(metrics.plot(run_dir, out))
