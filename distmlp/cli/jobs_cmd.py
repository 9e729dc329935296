"""`distmlp submit | status | logs | stop | jobs`: run jobs on a Ray cluster over the Jobs API."""

import datetime
import json
import sys
from typing import Annotated, Optional

import typer

from distmlp import config, jobs_api
from distmlp.cli.app import app, user_errors

Opt = typer.Option
Address = Annotated[Optional[str], Opt("--address", "-a", help="The cluster's Jobs API, http://HOST:8265 "
                                       "(default: $RAY_ADDRESS).", show_default=False)]
Insecure = Annotated[bool, Opt("--insecure", help="Allow plain http to a non-loopback address (the Ray "
                               "auth token crosses the network in clear text; without one anyone who "
                               "reaches it can run code).")]
AsJson = Annotated[bool, Opt("--json", help="Print one JSON object on stdout (human output to stderr).")]
JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="The id `distmlp submit` printed.")]


def echo_err(text):
    typer.echo(text, err=True)


def finished(state, echo):
    """Print the final status line; the exit code: 0 for SUCCEEDED, 1 otherwise."""
    echo(f"job {state.lower()}")
    return 0 if state == "SUCCEEDED" else 1


@app.command()
@user_errors
def submit(
    job_file: Annotated[str, typer.Argument(metavar="JOB.toml", help="Job file (TOML).")],
    address: Address = None,
    set_: Annotated[Optional[list[str]], Opt("--set", help="Override a job key: section.key=value "
                                             "(repeatable).")] = None,
    workdir: Annotated[Optional[str], Opt("--workdir", help="Upload this directory, which holds the job "
                                          "file, as the job's working directory, without dotfiles (.env, "
                                          ".git, .aws, ...), virtualenvs, runs/, data/, caches, what its "
                                          ".gitignore or .rayignore lists, and symlinks out of it.")] = None,
    wait: Annotated[bool, Opt("--wait", help="Follow the logs until the job ends; exit 1 unless it "
                              "succeeded.")] = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="List the files that would be uploaded and the "
                                 "command the job would run; contact no cluster.")] = False,
    sweep: Annotated[bool, Opt("--sweep", help="Run `distmlp sweep` on the cluster: --set values like "
                               "optimizer.lr=loguniform(0.001, 1) are searched (see `distmlp sweep --help`).")] = False,
    samples: Annotated[int, Opt("--samples", help="With --sweep: trials to sample.")] = 8,
    metric: Annotated[str, Opt("--metric", help="With --sweep: test_accuracy or test_loss.")] = "test_accuracy",
    as_json: AsJson = False,
    insecure: Insecure = False,
):
    """Submit a training job to a Ray cluster; prints the job id.

    Runs `distmlp train JOB.toml --address auto --json` on the cluster (distmlp must be
    installed there; see cluster.yaml). The run directory is ~/distmlp-runs/JOB_ID on the
    head unless the job sets run.run_dir. Just after `ray start --head` it waits up to 60 s
    for the head's job agent.

    Example: distmlp submit jobs/quickstart.toml --address http://127.0.0.1:8265 --wait
    """
    fixed, sweep_args = list(set_ or ()), None
    if sweep:  # search spaces checked here, the data set on the cluster
        from distmlp import sweep as sweeps
        fixed, spaces = sweeps.parse_sets(set_ or ())
        sweeps.check(config.load_job(job_file, fixed), spaces, 0, with_data=False)
        sweep_args = ["--samples", str(samples), "--metric", metric]
    config.load_job(job_file, fixed)  # a bad job file or --set fails before any network call
    if dry_run:
        show_upload(job_file, set_ or (), workdir, as_json, sweep_args, fixed)
        return
    client = jobs_api.connect(address, insecure)
    job_id, upload = jobs_api.submit(client, job_file, set_ or (), workdir, sweep_args, fixed)
    echo = echo_err if as_json else typer.echo
    echo(f"submitted {job_id} to {client.get_address()} ({len(upload.files)} file(s), "
         f"{upload.size / 1024:.1f} KiB)")
    code = 0
    state = None
    if wait:
        write = sys.stderr.write if as_json else sys.stdout.write
        state = jobs_api.follow(client, job_id, write)
        code = finished(state, echo)
    else:
        echo(f"follow it with: distmlp logs {job_id} --follow")
    if as_json:
        typer.echo(json.dumps({"job_id": job_id, "address": client.get_address(),
                               "status": state or jobs_api.status(client, job_id)}))
    elif not wait:
        typer.echo(job_id)
    raise typer.Exit(code)


def show_upload(job_file, overrides, workdir, as_json, sweep_args=None, fixed=None):
    """Print what `submit` would upload and run, without contacting a cluster."""
    _, _, home_run_dir = jobs_api.plan(job_file, overrides if fixed is None else fixed)
    with jobs_api.prepare(job_file, overrides, workdir, home_run_dir, sweep_args) as upload:
        if as_json:
            typer.echo(json.dumps({"workdir": upload.working_dir if workdir is not None else None,
                                   "files": list(upload.files), "size": upload.size,
                                   "excludes": list(upload.excludes), "entrypoint": upload.entrypoint}))
            return
        source = upload.working_dir if workdir is not None else f"the job file {job_file} alone"
        typer.echo(f"would upload {len(upload.files)} file(s), {upload.size / 1024:.1f} KiB, from {source}:")
        for name in upload.files:
            typer.echo(f"  {name}")
        typer.echo(f"and run: {upload.entrypoint}")


@app.command()
@user_errors
def status(job_id: JobId, address: Address = None, as_json: AsJson = False, insecure: Insecure = False):
    """Show a job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).

    Example: distmlp status distmlp-quickstart-20260101-120000-ab12 -a http://127.0.0.1:8265
    """
    details = jobs_api.info(jobs_api.connect(address, insecure), job_id)
    if as_json:
        typer.echo(json.dumps(details))
    else:
        typer.echo(f"{details['job_id']}  {details['status']}  {details['message'] or ''}".rstrip())


@app.command()
@user_errors
def logs(
    job_id: JobId,
    address: Address = None,
    follow: Annotated[bool, Opt("--follow", "-f", help="Keep streaming until the job ends; exit 1 "
                                "unless it succeeded.")] = False,
    insecure: Insecure = False,
):
    """Print a job's logs (the last line of a finished run is its JSON summary).

    Example: distmlp logs distmlp-quickstart-20260101-120000-ab12 --follow
    """
    client = jobs_api.connect(address, insecure)
    if not follow:
        typer.echo(jobs_api.logs(client, job_id), nl=False)
        return
    state = jobs_api.follow(client, job_id, sys.stdout.write)
    raise typer.Exit(finished(state, echo_err))


@app.command()
@user_errors
def stop(job_id: JobId, address: Address = None, insecure: Insecure = False):
    """Stop a running job and wait (up to 30 s) until it has stopped.

    Example: distmlp stop distmlp-quickstart-20260101-120000-ab12
    """
    client = jobs_api.connect(address, insecure)
    if not jobs_api.stop(client, job_id):
        typer.echo(f"{job_id} had already ended: {jobs_api.status(client, job_id)}")
        return
    typer.echo(f"{job_id} {jobs_api.wait(client, job_id, timeout_s=30)}")


def _time(ms):
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


@app.command("jobs")
@user_errors
def list_jobs(address: Address = None, as_json: AsJson = False, insecure: Insecure = False):
    """List the cluster's jobs, oldest first.

    Example: distmlp jobs --address http://127.0.0.1:8265
    """
    jobs = jobs_api.list_jobs(jobs_api.connect(address, insecure))
    if as_json:
        typer.echo(json.dumps(jobs))
        return
    for j in jobs:
        typer.echo(f"{j['job_id']:42s} {j['status']:10s} {_time(j['start_time'])}  {j['entrypoint']}")
