"""The typer app every command module adds its commands to, and the one-line error handling."""

import functools
from typing import Annotated

import typer

from distmlp import __version__
from distmlp.errors import RunStopped, UserError

app = typer.Typer(
    name="distmlp",
    help="Data-parallel MLP training on Ray, faithful to the seed notebook's math.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2 (3 for a run that stopped part-way), no traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(3 if isinstance(e, RunStopped) else 2) from None
    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"distmlp {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    """distmlp: train a small MLP data-parallel on Ray, locally or on a cluster."""
