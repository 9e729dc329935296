"""`distmlp sweep`: many trainings of one job at once on Ray Tune, with ASHA early stopping."""

import functools
import json
import sys
from typing import Annotated, Optional

import typer

from distmlp.cli.app import app, user_errors
from distmlp.errors import UserError

Opt = typer.Option


@app.command()
@user_errors
def sweep(
    job_file: Annotated[Optional[str], typer.Argument(metavar="[JOB.toml]", help="Job file (TOML).")] = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="section.key=value fixes a key; section.key=SPACE "
                                             "samples it per trial: loguniform(a, b), uniform(a, b), "
                                             "randint(a, b) (b excluded), choice(v, ...), grid(v, ...). "
                                             "Repeatable.")] = None,
    samples: Annotated[int, Opt("--samples", help="Trials to sample (each grid value gets this many).")] = 8,
    metric: Annotated[str, Opt("--metric", help="test_accuracy (higher is better) or test_loss (lower).")]
    = "test_accuracy",
    workers_per_trial: Annotated[int, Opt("--workers-per-trial", help="Worker actors per trial; 0: the trial "
                                          "trains in its own process.")] = 0,
    grace_period: Annotated[int, Opt("--grace-period", help="Evaluations every trial makes before ASHA may "
                                     "stop it.")] = 1,
    reduction_factor: Annotated[float, Opt("--reduction-factor", help="ASHA keeps about 1/this of the trials "
                                           "at each of its rungs.")] = 3,
    max_concurrent: Annotated[Optional[int], Opt("--max-concurrent", help="Trials running at once (default: "
                                                 "as many as the cluster's CPUs fit).")] = None,
    sweep_dir: Annotated[Optional[str], Opt("--sweep-dir", help="Sweep directory (default "
                                            "runs/<time>-<name>-sweep).")] = None,
    address: Annotated[Optional[str], Opt("--address", help="Ray cluster to join ('auto' or host:port); "
                                          "default: start an embedded local Ray.")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON summary as the last line of stdout.")] = False,
):
    """Train many variants of a job at once on Ray Tune; ASHA stops the trailing ones early.

    Each trial is a run in SWEEP_DIR/trials/<trial id>, evaluated every run.eval_every steps.
    At the end: a table of the trials on stdout and the best completed trial's job in
    SWEEP_DIR/best.toml (train it again with `distmlp train SWEEP_DIR/best.toml`).

    Example: distmlp sweep jobs/quickstart.toml --set 'optimizer.lr=loguniform(0.001, 1)' --samples 16
    """
    try:
        from distmlp import sweep as sweeps
    except ImportError as e:
        raise UserError(f"distmlp sweep needs Ray Tune ({e}): pip install 'distmlp[tune]'") from None
    # the stream bound now: while Tune runs, its own lines on stdout go to stderr
    echo = functools.partial(typer.echo, file=sys.stderr if as_json else sys.stdout)
    summary = sweeps.run_sweep(job_file, set_ or (), samples, metric, workers_per_trial, grace_period,
                               reduction_factor, max_concurrent, sweep_dir, address, echo)
    for line in sweeps.table(summary):
        echo(line)
    if as_json:
        typer.echo(json.dumps(summary))
