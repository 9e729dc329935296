"""`distmlp data ...`: inspect, download and convert data sets."""

from typing import Annotated, Optional

import numpy as np
import typer

from distmlp import data
from distmlp.cli import app, user_errors

data_app = typer.Typer(help="Inspect, download and convert data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataDir = Annotated[Optional[str], typer.Option("--data", help="An IDX directory or Parquet shard directory/URI.")]
DatasetName = Annotated[Optional[str], typer.Option("--dataset", help="A named data set: mnist-sample or mnist.")]


def resolve_source(data_dir, dataset):
    if data_dir is None and dataset is None:
        raise data.DataError("give --data DIR or --dataset NAME (mnist-sample, mnist)")
    return data.resolve(dataset=dataset, path=data_dir)


@data_app.command("info")
@user_errors
def info(data_dir: DataDir = None, dataset: DatasetName = None):
    """Counts, shapes and label histogram of a data set.

    Example: distmlp data info --dataset mnist-sample
    """
    source = resolve_source(data_dir, dataset)
    typer.echo(f"data set {source.name}")
    for name, split in (("train", source.train), ("held-out", source.test)):
        x, y = data.load_rows(split)
        hist = " ".join(str(c) for c in np.bincount(y, minlength=data.NUM_CLASSES))
        typer.echo(f"  {name:8s} {len(y):6d} images of {x.shape[1]} pixels | labels 0-9: {hist}")
