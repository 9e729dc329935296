"""`distmlp data ...`: inspect, download and convert data sets."""

import json
from typing import Annotated, Optional

import typer

from distmlp import data
from distmlp.cli.app import app, user_errors

data_app = typer.Typer(help="Inspect, download and convert data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DataDir = Annotated[Optional[str], typer.Option("--data", help="An IDX directory or Parquet shard directory/URI.")]
DatasetName = Annotated[Optional[str], typer.Option("--dataset", help="A named data set: mnist-sample or mnist.")]


def resolve_source(data_dir, dataset):
    if data_dir is None and dataset is None:
        raise data.DataError("give --data DIR or --dataset NAME (mnist-sample, mnist)")
    if data_dir is not None and dataset is not None:
        raise data.DataError("give either --data or --dataset, not both")
    return data.resolve(dataset=dataset, path=data_dir)


@data_app.command("info")
@user_errors
def info(data_dir: DataDir = None, dataset: DatasetName = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False):
    """Counts, shapes and label histogram of a data set.

    Example: distmlp data info --dataset mnist-sample
    """
    summary = data.describe(resolve_source(data_dir, dataset))
    if as_json:
        typer.echo(json.dumps(summary))
        return
    typer.echo(f"data set {summary['name']}")
    for name in ("train", "test"):
        split = summary[name]
        shape = "x".join(str(d) for d in split["image_shape"])
        hist = " ".join(str(c) for c in split["labels"])
        typer.echo(f"  {name:5s} {split['count']:6d} images of {shape} | labels 0-9: {hist}")


@data_app.command("convert")
@user_errors
def convert(out: Annotated[str, typer.Option("-o", "--out", help="New directory for the shards.")],
            shards: Annotated[int, typer.Option("--shards", help="Parquet files per split.")] = 1,
            data_dir: DataDir = None, dataset: DatasetName = None,
            row_group: Annotated[int, typer.Option("--row-group", help="Rows per Parquet row group.")] = 4096):
    """Write a data set as Parquet shards (N files per split) plus manifest.json.

    Example: distmlp data convert --dataset mnist-sample --shards 4 -o shards/mnist-sample
    """
    from distmlp.data import parquet
    manifest = parquet.convert(resolve_source(data_dir, dataset), out, shards, row_group)
    for name, split in manifest["splits"].items():
        typer.echo(f"{name}: {split['rows']} rows in {len(split['files'])} files")
    typer.echo(f"wrote {out}")


@data_app.command("download")
@user_errors
def download(dataset: Annotated[str, typer.Argument(help="The data set to fetch: mnist.")],
             directory: Annotated[Optional[str], typer.Option(
                 "--dir", help="Where to put the files (default: $DISTMLP_DATA/mnist or the user cache).")] = None):
    """Fetch a data set's official files from https mirrors, checked against their published size,
    md5 and sha256, written atomically.

    Mirrors are tried in order; set DISTMLP_MNIST_MIRRORS to use others (https only).
    Example: distmlp data download mnist
    """
    from distmlp.data import download as fetch
    paths = fetch.download(dataset, directory, progress=True, log=lambda line: typer.echo(line, err=True))
    use = f"--dataset {dataset}" if directory is None else f"--data {paths[0].parent}"
    typer.echo(f"{dataset}: {len(paths)} files in {paths[0].parent}; use it with {use}")
