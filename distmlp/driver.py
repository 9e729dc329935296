"""Runs a job: resolves the data, starts the backend, trains with the loop's hooks, reports.

The backend is the single-process trainer in this process (cluster.workers = 0, no Ray at
all) or worker actors on Ray (an embedded local Ray, or the cluster at cluster.address) driven
by a transport (distmlp.transport). Only this module's run_job writes the run directory.
"""

import math
import os
import time

import numpy as np

from distmlp import checkpoint, config, data, kernels, metrics, progress, storage, tracking, trainer
from distmlp.errors import RunStopped, UserError


def run_hooks(job, run_dir, checkpoint_hook, quiet=False, echo=print):
    """The hooks of a CLI run, in order: progress, metrics files, checkpoints, TensorBoard, MLflow
    (when run.mlflow_uri is set). The metrics files come before the checkpoint so a checkpoint
    never names a step whose record is not on disk; MLflow comes after it to upload the last one."""
    hooks = [progress.Progress(job.run.log_every, quiet=quiet, echo=echo),
             metrics.MetricsWriter(run_dir, job.run.checkpoint_every), checkpoint_hook,
             tracking.TensorBoardHook(run_dir, job)]
    if job.run.mlflow_uri:
        hooks.append(tracking.MlflowHook(job.run.mlflow_uri, job, run_dir, lambda: checkpoint_hook.last_path))
    return hooks


def examples_per_s(hooks):
    """Training examples per second of wall time over the run, as measured by its Progress hook."""
    return next(h.examples_per_s for h in hooks if isinstance(h, progress.Progress))


def _resume_hint(run_dir, latest):
    if latest is None:
        return "no checkpoint saved yet"
    return f"last good checkpoint {latest} (continue with: distmlp train --resume {run_dir})"


def default_run_dir(job):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{job.run.name}")


class OneThread:
    """The single-process backend with BLAS on one thread while it runs, as in a worker: its
    bits do not depend on how many cores the machine has (a sweep's trial and a rerun agree)."""

    def __init__(self, backend):
        from threadpoolctl import ThreadpoolController
        self.inner, self.workers, self.n_train, self.n_test = backend, 0, backend.n_train, backend.n_test
        self.limit = ThreadpoolController().limit(limits=1, user_api="blas")

    def run_steps(self, state, stop, plan):
        return self.inner.run_steps(state, stop, plan)

    def evaluate(self, params):
        return self.inner.evaluate(params)

    def close(self):
        self.inner.close()
        self.limit.restore_original_limits()


def start_backend(source, job, echo, on_change):
    """(backend, whether we started Ray) for job: in this process, or worker actors on Ray
    (elastic between cluster.min_workers and cluster.workers; on_change(event) hears of it)."""
    kernels.require(job.model.kernel)
    c = job.cluster
    if c.workers == 0:
        return OneThread(trainer.LocalBackend(source, job.model.dtype, job.model.kernel)), False
    from distmlp import connect, elastic
    cores = os.cpu_count() or 1
    wanted = math.ceil(c.workers * c.cpus_per_worker)
    started = connect.connect(c.address, num_cpus=max(cores, wanted))
    if started and wanted > cores:
        echo(f"note: {c.workers} workers of {c.cpus_per_worker:g} CPU share this machine's {cores} cores")
    try:
        return elastic.ElasticBackend(source, job, on_change), started
    except BaseException:
        if started:
            connect.disconnect()
        raise


RESUME_KEYS = ("cluster.", "run.steps", "run.epochs", "run.eval_every", "run.log_every",
               "run.checkpoint_every", "run.keep_last", "run.on_nonfinite")  # what a resumed run may change


def check_resume_updates(updates):
    """Refuse updates {"section.key": value} to a resumed run that would change its math (model,
    optimizer, data, seed)."""
    refused = sorted(key for key in updates if not key.startswith(RESUME_KEYS))
    if refused:
        raise config.ConfigError(f"--resume: {refused[0]} would change the run's math; a resumed run may change "
                                 "only cluster.*, run.steps / epochs and how often it evaluates, logs and saves")


def resumed_job(job, updates):
    """The checkpoint's job with updates {"section.key": value} (see check_resume_updates)."""
    check_resume_updates(updates)
    sections = {}
    for key, value in updates.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    if "run" in sections and "epochs" in sections["run"] and "steps" not in sections["run"]:
        sections["run"]["steps"] = None  # --epochs extends a run that was given in steps
    return config.replace(job, **sections)


def run_job(job, resume=None, json_mode=False, echo=print, address=None, hooks=(), resume_updates=None):
    """Train job; returns the summary dict. hooks: extra loop hooks after the run's own.

    resume: a run directory; training continues from its newest valid checkpoint with the job
    saved there (changed by resume_updates, see resumed_job), on the cluster given by address
    (never one named by the run directory). Nothing is written until the data set resolved and
    the workers started.
    """
    t0 = time.perf_counter()
    state = None
    if resume is not None:
        check_resume_updates(resume_updates or {})
        path, ckpt = checkpoint.latest_valid(resume)
        job = resumed_job(ckpt.job, {**(resume_updates or {}), "cluster.address": address})
        state = checkpoint.to_train_state(ckpt)
        run_dir = str(resume)
        echo(f"resuming {run_dir} from {path} (step {state.step})")
    else:
        run_dir = job.run.run_dir or default_run_dir(job)
        if storage.listing(run_dir):
            raise UserError(f"{run_dir}: run directory exists and is not empty (use --resume {run_dir})")
    source = data.resolve(job.data.dataset, job.data.path)
    sampler = trainer.make_sampler(job, source.train.count)  # refuses a batch larger than the data set
    if resume is not None:
        checkpoint.check_sampler(ckpt, sampler)  # the data set must still give the same batches
    if job.optimizer.name == "sgd" and job.cluster.workers > 1:
        echo("note: sgd updates after every example, so more workers add no speed (only shards the data)")
    changes, writers = [], []

    def on_change(event):  # a change of the worker count: a progress line and a record in metrics.jsonl
        changes.append(event)
        echo(f"workers {event['workers_before']} -> {event['workers_after']} at step {event['step']} "
             f"({event['why']}; {event['nodes']} node(s), regrouped in {event['seconds']:.1f} s)")
        for writer in writers:
            writer.event(event)
    backend, started = start_backend(source, job, echo, on_change)
    try:
        where = (f"{job.cluster.workers} workers on {len(backend.group.nodes())} node(s)"
                 if job.cluster.workers else "in this process (no Ray workers)")
        echo(f"{where} | {job.optimizer.name} lr {job.optimizer.learning_rate} | "
             f"{source.name}: {backend.n_train} train, {backend.n_test} held out")
        storage.make_dirs(run_dir)
        storage.write_bytes(storage.join(run_dir, "job.toml"), config.to_toml(job).encode())
        ckpt_hook = checkpoint.CheckpointHook(run_dir, job, job.run.checkpoint_every, job.run.keep_last)
        loop_hooks = [*run_hooks(job, run_dir, ckpt_hook, quiet=json_mode, echo=echo), *hooks]
        writers += [h for h in loop_hooks if isinstance(h, metrics.MetricsWriter)]
        try:
            # a diverging run's NumPy overflows are the loop's to report (one line), not warnings
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                state = trainer.train(job, backend, state, loop_hooks)
        except RunStopped as e:
            raise type(e)(f"{e}; {_resume_hint(run_dir, checkpoint.pointer(run_dir))}") from None
    finally:
        backend.close()
        if started:
            from distmlp import connect
            connect.disconnect()
    m = state.metrics
    return {"run_dir": run_dir, "checkpoint": ckpt_hook.last_path, "workers": job.cluster.workers,
            "optimizer": job.optimizer.name, "steps": state.step, "epochs": m.get("epoch"),
            "train_loss": m.get("train_loss"), "test_loss": m.get("test_loss"),
            "test_accuracy": m.get("test_accuracy"), "wall_s": time.perf_counter() - t0, "membership": changes,
            "examples_per_s": examples_per_s(loop_hooks), "best_checkpoint": checkpoint.pointer(run_dir, "best"),
            # data.path wins over data.dataset (which keeps its default beside it): name what was used
            "dataset": None if job.data.path else job.data.dataset, "data_path": job.data.path}
