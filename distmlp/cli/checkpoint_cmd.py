"""`distmlp evaluate` and `distmlp checkpoint ...`: score, inspect, export and import checkpoints."""

import json
from typing import Annotated, Optional

import typer

from distmlp import checkpoint, config, data, mlp
from distmlp.cli.app import app, user_errors
from distmlp.cli.data_cmd import DataDir, DatasetName, resolve_source

ckpt_app = typer.Typer(help="Inspect, export and import checkpoints.", no_args_is_help=True)
app.add_typer(ckpt_app, name="checkpoint")

CkptPath = Annotated[str, typer.Argument(
    metavar="CKPT", help="A checkpoint directory, or a run directory (its newest valid checkpoint); a path or a URI.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
EXPORT_FORMATS = ("seed-pickle",)


def evaluate_checkpoint(ckpt, source):
    """{"test_accuracy", "test_loss", "n"} of ckpt's weights on source's held-out split."""
    x, y = data.load_rows(source.test)  # (n, 784) uint8, (n,) uint8
    n_inputs = ckpt.params["W1"].shape[1]
    if x.shape[1] != n_inputs:
        raise data.DataError(f"{source.name}: images have {x.shape[1]} pixels, the model takes {n_inputs} inputs")
    if len(y) == 0:
        raise data.DataError(f"{source.name}: the held-out split is empty")
    x = mlp.scale_pixels(x, ckpt.params["W1"].dtype.type)
    correct, loss_sum, n = mlp.evaluate_sums(ckpt.params, x, y)
    return {"test_accuracy": correct / n, "test_loss": loss_sum / n, "n": n}


@app.command("evaluate")
@user_errors
def evaluate(path: CkptPath, data_dir: DataDir = None, dataset: DatasetName = None, as_json: AsJson = False):
    """Held-out accuracy and loss of a checkpoint.

    Example: distmlp evaluate runs/my-run --dataset mnist-sample --json
    """
    path, ckpt = checkpoint.resolve(path)
    result = evaluate_checkpoint(ckpt, resolve_source(data_dir, dataset))
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{path}: held-out accuracy {result['test_accuracy']:.2%} | "
                   f"loss {result['test_loss']:.4f} | {result['n']} images")


@ckpt_app.command("inspect")
@user_errors
def inspect(path: CkptPath, as_json: AsJson = False):
    """Step, layers, metrics and config of a checkpoint, and whether it verifies.

    Exit code 2 when the checksums or the schema do not verify.
    Example: distmlp checkpoint inspect runs/my-run
    """
    info = checkpoint.describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        typer.echo(format_description(info))
    if not info["verified"]:
        raise typer.Exit(2)


def format_description(info):
    if not info["verified"]:
        return f"checkpoint {info['path']}\n  verified  NO: {info['error']}"
    metrics = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                         for k, v in sorted(info["metrics"].items()))
    job = config.job_from_dict(info["config"])
    lines = [f"checkpoint {info['path']}",
             "  verified  yes (manifest SHA-256 of every file, schema and shapes)",
             f"  step      {info['step']} (epoch {info['epoch']:.3g}, {info['samples_seen']} samples seen)",
             f"  layers    {'-'.join(map(str, info['sizes']))} {info['dtype']}",
             f"  optimizer {job.optimizer.name}, state: {', '.join(info['optimizer_state']) or 'none'}",
             f"  metrics   {metrics or 'none'}",
             "  config"]
    lines += [f"    {line}" for line in config.to_toml(job).splitlines() if line]
    return "\n".join(lines)


@ckpt_app.command("export")
@user_errors
def export(
    path: CkptPath,
    output: Annotated[str, typer.Option("-o", "--output", help="The file to write, e.g. weights_biases.pkl.")],
    fmt: Annotated[str, typer.Option("--format", help="seed-pickle: the seed notebook's weights_biases.pkl.")]
    = "seed-pickle",
):
    """Write a checkpoint's weights in another format.

    Example: distmlp checkpoint export runs/my-run --format seed-pickle -o weights_biases.pkl
    """
    if fmt not in EXPORT_FORMATS:
        raise checkpoint.CheckpointError(f"--format {fmt!r}: allowed: {', '.join(EXPORT_FORMATS)}")
    path, ckpt = checkpoint.resolve(path)
    checkpoint.export_seed_pickle(ckpt, output)
    typer.echo(f"wrote {output} (seed pickle, step {ckpt.step} of {path})")


@ckpt_app.command("import")
@user_errors
def import_pickle(
    pickle_path: Annotated[str, typer.Argument(metavar="PICKLE", help="A seed-format weights_biases.pkl.")],
    output: Annotated[str, typer.Option("-o", "--output", help="The run directory to create "
                                        "(its checkpoints/step-000000 holds the weights).")],
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Load with the unrestricted pickle loader: runs any code in the file.")] = False,
    dtype: Annotated[str, typer.Option("--dtype", help="float64 (the seed's Python floats) or float32.")]
    = "float64",
    job_file: Annotated[Optional[str], typer.Option("--job", help="Job file the checkpoint records "
                                                    "(default: the default job).")] = None,
):
    """Turn a seed weights_biases.pkl into a run directory with a step-0 checkpoint.

    `distmlp evaluate DIR` scores it; `distmlp train --resume DIR` trains on from it.
    Example: distmlp checkpoint import weights_biases.pkl -o runs/seed
    """
    job = config.load_job(job_file, [f"model.dtype={json.dumps(dtype)}"])
    path = checkpoint.import_seed_pickle(pickle_path, output, trust=trust_pickle, job=job)
    typer.echo(f"wrote checkpoint {path} (step 0, {dtype})")
