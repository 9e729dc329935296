"""`distmlp train`: run a job on embedded Ray or on a cluster."""

import json
import shlex
from typing import Annotated, Optional

import typer

from distmlp import config
from distmlp.cli.app import app, user_errors

Opt = typer.Option


def job_updates(data_dir=None, dataset=None, workers=None, optimizer=None, lr=None, batch_size=None,
                epochs=None, steps=None, seed=None, address=None, run_dir=None):
    """The {"section.key": value} updates the shortcut options make (None: option not given)."""
    updates = {}
    if data_dir is not None:
        updates.update({"data.path": data_dir, "data.dataset": None})
    if dataset is not None:
        updates.update({"data.dataset": dataset, "data.path": None})
    if epochs is not None:
        updates.update({"run.epochs": epochs, "run.steps": None})
    if steps is not None:
        updates["run.steps"] = steps
    for key, value in (("cluster.workers", workers), ("optimizer.name", optimizer), ("optimizer.lr", lr),
                       ("optimizer.batch_size", batch_size), ("run.seed", seed),
                       ("cluster.address", address), ("run.run_dir", run_dir)):
        if value is not None:
            updates[key] = value
    return updates


@app.command()
@user_errors
def train(
    job_file: Annotated[Optional[str], typer.Argument(metavar="[JOB.toml]", help="Job file (TOML).")] = None,
    data_dir: Annotated[Optional[str], Opt("--data", help="IDX directory or Parquet shards (path or URI).")] = None,
    dataset: Annotated[Optional[str], Opt("--dataset", help="mnist-sample (bundled) or mnist (downloaded).")] = None,
    workers: Annotated[Optional[int], Opt("--workers", help="Worker actors, one shard each.")] = None,
    optimizer: Annotated[Optional[str], Opt("--optimizer", help="sgd | minibatch | gd.")] = None,
    lr: Annotated[Optional[float], Opt("--lr", help="Learning rate (default: the seed's).")] = None,
    batch_size: Annotated[Optional[int], Opt("--batch-size", help="Global minibatch size.")] = None,
    epochs: Annotated[Optional[int], Opt("--epochs", help="Passes over the training split.")] = None,
    steps: Annotated[Optional[int], Opt("--steps", help="Optimizer steps (wins over --epochs).")] = None,
    seed: Annotated[Optional[int], Opt("--seed", help="Seed for weights and sampling.")] = None,
    address: Annotated[Optional[str], Opt("--address", help="Ray cluster to join ('auto' or host:port); "
                                          "default: start an embedded local Ray.")] = None,
    run_dir: Annotated[Optional[str], Opt("--run-dir", help="Run directory: a path or a URI "
                                          "(s3://bucket/prefix, gs://..., file://...) (default runs/<time>-<name>).")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a job key: section.key=value (repeatable).")] = None,
    resume: Annotated[Optional[str], Opt("--resume", help="Continue RUN_DIR from its newest valid checkpoint "
                                         "(with --workers, --steps/--epochs, --set cluster.*/run.* to change).")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON summary as the last line of stdout.")] = False,
    quiet: Annotated[bool, Opt("--quiet", "-q", help="No progress output: only errors and the summary.")] = False,
):
    """Train a job on an embedded local Ray, on a cluster (--address), or in this process (--workers 0).

    Example: distmlp train jobs/quickstart.toml
    """
    updates = job_updates(data_dir, dataset, workers, optimizer, lr, batch_size, epochs, steps, seed,
                          address, run_dir)
    resume_updates = None
    if resume is not None:
        if job_file or run_dir is not None:
            raise config.ConfigError("--resume takes the job and run directory saved in RUN_DIR; "
                                     "give no job file or --run-dir with it")
        resume_updates = {**dict(config.parse_override_key(text) for text in set_ or ()), **updates}
        resume_updates.pop("cluster.address", None)
        job = None
    else:
        job = config.load_job(job_file, set_ or (), updates)
    if quiet:
        echo = lambda line: None  # noqa: E731
    else:
        echo = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    # json_mode: no progress bar (stdout is for the JSON line, or --quiet shows nothing)
    summary = run_training(job, resume=resume, json_mode=as_json or quiet, echo=echo, address=address,
                           resume_updates=resume_updates)
    typer.echo(json.dumps(summary) if as_json else format_summary(summary))


def format_summary(summary):
    """The lines printed at the end of a run: results, where they are, and what to run next."""
    acc, loss = summary["test_accuracy"], summary["test_loss"]
    held_out = f"held-out accuracy {acc:.2%} | loss {loss:.4f}" if acc is not None else "not evaluated"
    run_dir, q = summary["run_dir"], shlex.quote
    data = f"--data {q(summary['data_path'])}" if summary.get("data_path") else f"--dataset {q(summary['dataset'])}"
    best = summary.get("best_checkpoint") or summary["checkpoint"]
    return "\n".join([
        f"done: {held_out} | {summary['steps']} steps | {summary['examples_per_s']:,.0f} examples/s | "
        f"{summary['wall_s']:.1f} s",
        f"  run directory    {run_dir}",
        f"  best checkpoint  {best}",
        f"  plot the curves  distmlp plot {q(run_dir)} -o curves.png",
        f"  evaluate it      distmlp evaluate {q(best)} {data}",
        f"  TensorBoard      tensorboard --logdir {q(run_dir)}",
    ])


def run_training(job, resume=None, json_mode=False, echo=print, address=None, resume_updates=None):
    from distmlp import driver
    return driver.run_job(job, resume=resume, json_mode=json_mode, echo=echo, address=address,
                          resume_updates=resume_updates)
