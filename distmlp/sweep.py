"""Hyperparameter sweeps: many distmlp runs at once on Ray Tune, stopped early by ASHA.

`--set section.key=value` fixes a key as in `distmlp train`; a value written as a search space
samples it per trial:

    loguniform(a, b)   uniform(a, b)   randint(a, b) (b excluded)   choice(v, ...)   grid(v, ...)

Every space is checked before any trial starts, by building the job with both bounds of a
range and every value of a list. A trial is driver.run_job on the job with its sampled values
in SWEEP_DIR/trials/<trial id> (cluster.workers = the workers per trial; 0 trains inside the
trial's own process). Each evaluation of a trial (run.eval_every) is one report to Tune, and
ASHA stops the trials whose metric trails the others' at the same evaluation. A trial saves a
checkpoint at every evaluation before it reports, so a stopped trial's run directory holds its
checkpoint and metrics up to the step it stopped at. The sweep ends with a table of the trials,
SWEEP_DIR/best.toml (the best completed trial's job) and SWEEP_DIR/sweep.json (the summary).
"""

import contextlib
import json
import math
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from distmlp import checkpoint, config, data, storage, trainer
from distmlp.errors import UserError

SPACES = ("loguniform", "uniform", "randint", "choice", "grid")
METRICS = {"test_accuracy": "max", "test_loss": "min"}  # what an evaluation reports, and its better direction
STATUSES = ("completed", "early-stopped", "error")  # a trial's end, in the table's order
SET_BY_SWEEP = {"run.run_dir": "--sweep-dir", "cluster.workers": "--workers-per-trial"}
CALL = re.compile(r"([A-Za-z_]\w*)\s*\((.*)\)", re.DOTALL)  # name(args), the shape of a search space


class SweepError(UserError, ValueError):
    """A search space, a sweep option or a sweep directory the user got wrong; one line."""


@dataclass(frozen=True)
class Space:
    key: str  # "section.key"
    kind: str  # one of SPACES
    args: tuple  # (low, high) for a range, the values for choice and grid
    text: str  # the --set text it came from, for messages

    def representatives(self):
        """Values that stand for the space when checking it: a range's bounds, every listed value."""
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args

    def to_tune(self):
        if self.kind in ("choice", "grid"):
            values = list(self.args)
            return tune.choice(values) if self.kind == "choice" else tune.grid_search(values)
        return getattr(tune, self.kind)(*self.args)

    def describe(self):
        return f"{self.kind}({', '.join(repr(a) for a in self.args)})"


def parse_sets(texts):
    """(fixed overrides, [Space]) from --set texts; a fixed override stays text for config.load_job."""
    fixed, spaces = [], []
    for text in texts:
        space = parse_space(text)
        if space is None:
            fixed.append(text)
        elif space.key in {s.key for s in spaces}:
            raise SweepError(f"--set {text!r}: {space.key} already has a search space")
        else:
            spaces.append(space)
    return fixed, spaces


def parse_space(text):
    """A Space when the value of `section.key=value` is name(args), else None. No eval: the
    arguments are read as a TOML array (bare words as strings)."""
    (section, name), _ = config.parse_override(text)  # the key's shape, one-line errors
    value = text.partition("=")[2].strip()
    match = CALL.fullmatch(value)
    if match is None:
        return None
    kind, inner = match.groups()
    where = f"--set {text!r}"
    if kind not in SPACES:
        raise SweepError(f"{where}: unknown search space {kind!r}; allowed: {', '.join(SPACES)}")
    key = f"{section}.{name}"
    if key in SET_BY_SWEEP:
        raise SweepError(f"{where}: {key} is set by the sweep ({SET_BY_SWEEP[key]})")
    args = _parse_args(inner, where)
    if kind in ("choice", "grid"):
        if not args:
            raise SweepError(f"{where}: {kind} needs at least one value")
    else:
        _check_range(kind, args, where)
    return Space(key, kind, tuple(args), text)


def _parse_args(inner, where):
    if not inner.strip():
        return []
    try:
        return tomllib.loads(f"v = [{inner}]")["v"]
    except tomllib.TOMLDecodeError:
        pass
    values = []
    for item in inner.split(","):
        item = item.strip()
        if not item:
            raise SweepError(f"{where}: empty value in the argument list")
        try:
            values.append(tomllib.loads(f"v = {item}")["v"])
        except tomllib.TOMLDecodeError:
            if not re.fullmatch(r"[\w.+-]+", item):
                raise SweepError(f"{where}: cannot read {item!r} (quote strings, e.g. \"adam\")") from None
            values.append(item)
    return values


def _check_range(kind, args, where):
    is_int = [isinstance(a, int) and not isinstance(a, bool) for a in args]
    numbers = all(is_int[i] or isinstance(a, float) for i, a in enumerate(args))
    if len(args) != 2 or not numbers or not all(math.isfinite(a) for a in args):
        raise SweepError(f"{where}: {kind} needs two finite numbers, {kind}(low, high)")
    low, high = args
    if kind == "randint" and not all(is_int):
        raise SweepError(f"{where}: randint needs two integers, randint(low, high) with high excluded")
    if not low < high:
        raise SweepError(f"{where}: {kind} needs low < high, got {low!r} and {high!r}")
    if kind == "loguniform" and low <= 0:
        raise SweepError(f"{where}: loguniform needs 0 < low, got {low!r}")


def trial_job(base, values, workers, run_dir=None):
    """The job a trial runs: base with the sampled {"section.key": value}, the workers per trial,
    its run directory, and a checkpoint at every evaluation (where a trial can be stopped)."""
    raw = config.to_dict(base)
    for key, value in values.items():
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = value
    raw.setdefault("cluster", {})["workers"] = workers
    run = raw.setdefault("run", {})
    run["checkpoint_every"] = run.get("eval_every", 0)
    run.pop("run_dir", None)
    if run_dir is not None:
        run["run_dir"] = run_dir
    return config.job_from_dict(raw, source="sweep")


def evaluations(job, n_train):
    """How many evaluations a run of job makes: every eval_every steps and at the last step."""
    return math.ceil(trainer.total_steps(job, trainer.make_sampler(job, n_train)) / job.run.eval_every)


def check(base, spaces, workers, with_data=True):
    """Build the job with every representative value of every space (data set included unless
    with_data is False: a sweep submitted to a cluster uses the cluster's data); returns the most
    evaluations any of them makes (ASHA's max_t), 0 without the data."""
    if base.run.eval_every == 0:
        raise SweepError("run.eval_every is 0: a trial would be evaluated once, at its end, and ASHA "
                         "needs its evaluations to compare trials (e.g. --set run.eval_every=50)")
    sources, most = {}, 0
    cases = [(None, {})] + [(s, {s.key: v}) for s in spaces for v in s.representatives()]
    for space, values in cases:
        try:
            job = trial_job(base, values, workers)
            if not with_data:
                continue
            where = (job.data.dataset, job.data.path)
            if where not in sources:
                sources[where] = data.resolve(*where)
            most = max(most, evaluations(job, sources[where].train.count))
        except UserError as e:
            raise SweepError(f"--set {space.text!r}: {e}" if space else str(e)) from None
    return most


class ReportToTune(trainer.Hook):
    """Reports every evaluation but the last to Tune (the trial reports the last one after the
    run has finished); the checkpoint at that step is already saved when it reports."""

    def __init__(self):
        self.steps = None

    def on_start(self, state, info):
        self.steps = info["steps"]

    def on_step(self, state, record):
        if "test_accuracy" in record and record["step"] < self.steps:
            tune.report(tune_metrics(record, self.steps))


def tune_metrics(record, steps):
    """What a trial reports at an evaluation (Tune adds training_iteration: the evaluations so far)."""
    return {"step": record["step"], "steps": steps, "test_accuracy": record["test_accuracy"],
            "test_loss": record["test_loss"]}


def run_trial(values, base, sweep_dir, workers):
    """One trial (a Tune function trainable): the job with values, trained by driver.run_job."""
    from distmlp import driver
    run_dir = os.path.join(sweep_dir, "trials", tune.get_context().get_trial_id())
    job = trial_job(base, values, workers, run_dir)
    summary = driver.run_job(job, json_mode=True, echo=lambda line: None, hooks=[ReportToTune()])
    tune.report(tune_metrics({**summary, "step": summary["steps"]}, summary["steps"]))


def default_sweep_dir(job):
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{job.run.name}-sweep")


def run_sweep(job_file, sets=(), samples=8, metric="test_accuracy", workers_per_trial=0, grace_period=1,
              reduction_factor=3, max_concurrent=None, sweep_dir=None, address=None, echo=print):
    """Run the sweep; returns the summary (also written to SWEEP_DIR/sweep.json)."""
    from distmlp.connect import connect

    t0 = time.perf_counter()
    if metric not in METRICS:
        raise SweepError(f"--metric {metric}: allowed: {', '.join(METRICS)}")
    for name, value, low in (("--samples", samples, 1), ("--workers-per-trial", workers_per_trial, 0),
                             ("--grace-period", grace_period, 1), ("--max-concurrent", max_concurrent, 1)):
        if value is not None and value < low:
            raise SweepError(f"{name} {value}: must be >= {low}")
    if not reduction_factor > 1:
        raise SweepError(f"--reduction-factor {reduction_factor}: must be > 1")
    fixed, spaces = parse_sets(sets)
    if not spaces:
        raise SweepError("no search space: give at least one --set section.key=SPACE, "
                         "e.g. --set 'optimizer.lr=loguniform(0.001, 1)'")
    base = config.load_job(job_file, fixed, {"cluster.address": address} if address else None)
    if base.data.path is not None and "://" not in base.data.path:
        base = config.replace(base, data={"path": os.path.abspath(base.data.path)})  # trials run elsewhere
    max_t = check(base, spaces, workers_per_trial)
    if grace_period > max_t:
        raise SweepError(f"--grace-period {grace_period}: a trial makes at most {max_t} evaluations")
    if sweep_dir and storage.is_remote(sweep_dir):
        raise SweepError(f"--sweep-dir {sweep_dir}: a sweep directory is local (Ray Tune keeps its state there); "
                         "the trials' run directories follow it")
    sweep_dir = os.path.abspath(sweep_dir or default_sweep_dir(base))
    if os.path.exists(sweep_dir) and os.listdir(sweep_dir):
        raise SweepError(f"{sweep_dir}: sweep directory exists and is not empty")
    os.makedirs(sweep_dir, exist_ok=True)
    echo(f"sweep {sweep_dir}: {samples} sample(s) of {', '.join(f'{s.key}={s.describe()}' for s in spaces)}; "
         f"ASHA on {metric} over up to {max_t} evaluations a trial")
    started = connect(base.cluster.address)
    try:
        results = _tune(base, spaces, samples, metric, workers_per_trial, grace_period, reduction_factor,
                        max_t, max_concurrent, sweep_dir, echo)
    finally:
        if started:
            ray.shutdown()
    rows = [_row(r, spaces, sweep_dir) for r in results]
    rows.sort(key=lambda r: (STATUSES.index(r["status"]), _order(r, metric)))
    done = [r for r in rows if r["status"] == "completed"]
    if not done:
        first = next((r["error"] for r in rows if r.get("error")), "every trial was stopped")
        raise SweepError(f"no trial completed ({first}); Tune's logs are in {os.path.join(sweep_dir, 'tune')}")
    best = done[0]
    best_job = config.replace(trial_job(base, best["params"], workers_per_trial), run={"run_dir": None})
    best_path = os.path.join(sweep_dir, "best.toml")
    with open(best_path, "w") as f:
        f.write(config.to_toml(best_job))
    summary = {"sweep_dir": sweep_dir, "metric": metric, "mode": METRICS[metric], "samples": samples,
               "workers_per_trial": workers_per_trial, "max_evaluations": max_t,
               "spaces": {s.key: s.describe() for s in spaces},
               "best": {"trial": best["trial"], metric: best[metric], "params": best["params"],
                        "run_dir": best["run_dir"], "checkpoint": best["checkpoint"], "job": best_path},
               "completed": len(done), "early_stopped": sum(r["status"] == "early-stopped" for r in rows),
               "errors": sum(r["status"] == "error" for r in rows), "trials": rows,
               "wall_s": time.perf_counter() - t0}
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _tune(base, spaces, samples, metric, workers, grace_period, reduction_factor, max_t, concurrent, sweep_dir,
          echo):
    """Tuner.fit over the spaces; the list of its Results."""
    trainable = tune.with_parameters(run_trial, base=base, sweep_dir=sweep_dir, workers=workers)
    # One CPU for the trial's process (it trains, or drives its workers). Workers start their
    # own placement group, outside the trial's: with workers, Tune runs only as many trials at
    # once as the cluster has CPUs for, each trial's process and workers together, and does not
    # keep a finished trial's process for the next one (it would hold its CPU meanwhile).
    trainable = tune.with_resources(trainable, tune.PlacementGroupFactory([{"CPU": 1}]))
    if workers and concurrent is None:
        per_trial = 1 + workers * base.cluster.cpus_per_worker
        concurrent = max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=grace_period,
                              reduction_factor=reduction_factor)
    # draws seeded by the job; the generator itself limits concurrency (Tune ignores
    # TuneConfig.max_concurrent_trials when it is given a generator)
    search = BasicVariantGenerator(random_state=base.run.seed, max_concurrent=concurrent or 0)
    tuner = tune.Tuner(
        trainable,
        param_space={s.key: s.to_tune() for s in spaces},
        tune_config=tune.TuneConfig(metric=metric, mode=METRICS[metric], num_samples=samples, search_alg=search,
                                    scheduler=scheduler, trial_dirname_creator=_trial_id,
                                    reuse_actors=not workers),
        run_config=tune.RunConfig(storage_path=sweep_dir, name="tune", verbose=0,
                                  callbacks=[TrialLines(spaces, metric, os.path.join(sweep_dir, "tune"), echo)]),
    )
    with contextlib.redirect_stdout(sys.stderr):  # Tune's own lines, whatever its verbosity
        return list(tuner.fit())


class TrialLines(tune.Callback):
    """One line per trial as it ends (completed, early-stopped or failed), in the sweep's process."""

    def __init__(self, spaces, metric, tune_dir, echo):
        self.spaces, self.metric, self.tune_dir, self.echo = spaces, metric, tune_dir, echo

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        status = _status(r)
        values = " ".join(f"{s.key}={_fmt(trial.config.get(s.key))}" for s in self.spaces)
        self.echo(f"trial {trial.trial_id} {status} at step {r.get('step')}/{r.get('steps')} | "
                  f"{self.metric} {_fmt(r.get(self.metric))} | {values}")

    def on_trial_error(self, iteration, trials, trial, **info):
        where = os.path.join(self.tune_dir, trial.trial_id, "error.txt")
        self.echo(f"trial {trial.trial_id} failed; its error: {where}")


def _trial_id(trial):
    """Tune's directory for a trial is named by its id, like the trial's run directory."""
    return trial.trial_id


def _row(result, spaces, sweep_dir):
    """One trial's line of the results table (a dict)."""
    m = result.metrics or {}
    trial = os.path.basename(result.path)
    run_dir = os.path.join(sweep_dir, "trials", trial)
    params = {s.key: result.config[s.key] for s in spaces}
    row = {"trial": trial, "params": params, "test_accuracy": m.get("test_accuracy"),
           "test_loss": m.get("test_loss"), "step": m.get("step"), "steps": m.get("steps"),
           "evaluations": m.get("training_iteration", 0), "run_dir": run_dir, "checkpoint": None}
    if result.error is not None:
        row.update(status="error", error=_error_line(result.error))
    else:
        row["status"] = _status(m)
    if m.get("step") is not None:
        row["checkpoint"] = str(checkpoint.checkpoints_dir(run_dir) / checkpoint.step_name(m["step"]))
    return row


def _status(reported):
    """A trial that did not fail either reached its last step or was stopped by ASHA."""
    return "completed" if reported.get("step") == reported.get("steps") else "early-stopped"


def _error_line(error):
    """The last line of an error's text: the exception's message under its traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _order(row, metric):
    value = row[metric]
    if value is None:
        return math.inf
    return -value if METRICS[metric] == "max" else value


def table(summary):
    """The results table as lines: trial, the sampled values, the metric, steps, status."""
    metric, rows = summary["metric"], summary["trials"]
    keys = list(summary["spaces"])
    head = ["trial", *keys, metric, "steps", "evals", "status"]
    body = [[r["trial"], *(_fmt(r["params"][k]) for k in keys), _fmt(r[metric]),
             f"{r['step'] or 0}/{r['steps'] or '?'}", str(r["evaluations"]), r["status"]] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [head, *body]]
    lines += [f"{r['trial']}: {r['error']}" for r in rows if r["status"] == "error"]
    best = summary["best"]
    lines.append(f"best: trial {best['trial']} ({metric} {_fmt(best[metric])}), job {best['job']}")
    return lines


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
