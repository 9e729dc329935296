"""The training loop, and the single-process backend it runs on without Ray.

The loop is backend-agnostic: a backend computes gradient sums and evaluation sums for the
current weights; the loop averages (sum / total count), updates, evaluates and reports. The
Ray driver (driver.py) supplies a backend made of worker actors; LocalBackend here holds the
whole data set in this process and is the reference the distributed runs are tested against.
"""

import math
import time
from dataclasses import dataclass, field

import numpy as np

from distmlp import data, mlp, optim
from distmlp.errors import UserError
from distmlp.sampling import Sampler


class DivergenceError(UserError, RuntimeError):
    """A non-finite loss, gradient or update; names the step (and the worker when known)."""


@dataclass
class TrainState:
    params: dict
    opt_state: dict
    step: int = 0  # optimizer steps done
    samples_seen: int = 0
    nonfinite_streak: int = 0  # consecutive skipped updates (on_nonfinite = "skip")
    metrics: dict = field(default_factory=dict)  # the latest step record


@dataclass
class StepResult:
    grads: dict  # gradient sums over the examples
    loss_sum: float
    count: int
    compute_s: float  # time spent computing in the slowest worker
    bad_worker: str | None = None  # the first worker whose partial result was non-finite


class Hook:
    """A training-loop hook that does nothing: subclasses override what they need.

    next_stop(step): the first step after `step` at which the hook needs state.params (rounds
    of steps end there); None when it needs none.
    """

    def on_start(self, state, info):
        pass

    def on_step(self, state, record):
        pass

    def on_end(self, state, record):
        pass

    def next_stop(self, step):
        return None


def initial_state(job):
    rng = np.random.default_rng(job.run.seed)
    params = mlp.init_params(job.model.sizes, rng, np.dtype(job.model.dtype).type)
    return TrainState(params, optim.init_state(params, job.optimizer.momentum))


def make_sampler(job, n_train):
    o = job.optimizer
    if o.name == "minibatch" and o.batch_size > n_train:
        from distmlp.config import ConfigError
        raise ConfigError(f"optimizer.batch_size: {o.batch_size} is larger than the {n_train} training examples")
    return Sampler(o.name, n_train, o.batch_size, o.sampling_mode, job.run.seed)


def total_steps(job, sampler):
    if job.run.steps is not None:
        return job.run.steps
    return (job.run.epochs or 1) * sampler.steps_per_epoch


def is_finite(result):
    return math.isfinite(result.loss_sum) and all(np.isfinite(g).all() for g in result.grads.values())


def train(job, backend, state=None, hooks=()):
    """Run job on backend from state (a fresh start when None); returns the final TrainState.

    hooks get on_start(state, info), on_step(state, record) after every step, and
    on_end(state, record); records are flat dicts (step, epoch, losses, timings ...).
    """
    state = state or initial_state(job)
    sampler = make_sampler(job, backend.n_train)
    steps = total_steps(job, sampler)
    lr, momentum = job.optimizer.learning_rate, job.optimizer.momentum
    eval_every = job.run.eval_every
    info = {"steps": steps, "steps_per_epoch": sampler.steps_per_epoch, "workers": backend.workers,
            "n_train": backend.n_train, "n_test": backend.n_test}
    for hook in hooks:
        hook.on_start(state, info)
    record = state.metrics
    run_steps = getattr(backend, "run_steps", None)  # a backend that runs many steps per call
    while state.step < steps:
        t0 = time.perf_counter()
        done = run_steps(state, _next_stop(state.step, steps, eval_every, hooks)) if run_steps else None
        if not done:  # one step here: gradient sums from the backend, update, divergence policy
            batch = sampler.batch(state.step)
            result = backend.grad_sums(state.params, batch, state.step)
            update = _update(state, result, lr, momentum) if is_finite(result) else None
            if update is not None:
                state.params, state.opt_state = update
                state.nonfinite_streak = 0
            else:
                _on_nonfinite(job, state, result)
            wall = time.perf_counter() - t0
            done = [(result.loss_sum, result.count, result.compute_s, wall)]
        else:  # already applied by the backend, all finite
            state.nonfinite_streak = 0
        for loss_sum, count, compute_s, wall in done:
            state.step += 1
            state.samples_seen += count
            record = {"step": state.step, "epoch": state.step / sampler.steps_per_epoch,
                      "samples_seen": state.samples_seen, "train_loss": loss_sum / count,
                      "lr": lr, "step_s": wall, "compute_s": compute_s, "comm_s": max(wall - compute_s, 0.0)}
            if (eval_every and state.step % eval_every == 0) or state.step == steps:
                record.update(evaluate(backend, state.params))
            state.metrics = record
            for hook in hooks:
                hook.on_step(state, record)
    for hook in hooks:
        hook.on_end(state, record)
    return state


def _next_stop(step, steps, eval_every, hooks):
    """The first step after `step` at which the loop needs the weights: evaluation, the end, or a
    hook's next_stop(step) (checkpoints; test hooks acting between steps)."""
    stops = [steps]
    if eval_every:
        stops.append((step // eval_every + 1) * eval_every)
    for hook in hooks:
        at = hook.next_stop(step) if hasattr(hook, "next_stop") else None
        if at is not None:
            stops.append(at)
    return min(stops)


def _update(state, result, lr, momentum):
    """(params, opt_state) after the step, or None when the update itself overflowed."""
    grads = optim.mean_grads(result.grads, result.count)
    params, opt_state = optim.step(state.params, grads, state.opt_state, lr, momentum)
    finite = all(np.isfinite(a).all() for group in (params, opt_state) for a in group.values())
    return (params, opt_state) if finite else None


MAX_SKIPPED = 3  # on_nonfinite = "skip": the run stops at the third non-finite step in a row


def _on_nonfinite(job, state, result):
    """Skip the update (policy "skip", fewer than MAX_SKIPPED in a row) or raise DivergenceError."""
    if is_finite(result):
        what = "update (finite gradient, overflowing weights)"
    else:
        what = "loss or gradient" + (f" in worker {result.bad_worker}" if result.bad_worker else "")
    if job.run.on_nonfinite == "skip" and state.nonfinite_streak < MAX_SKIPPED - 1:
        state.nonfinite_streak += 1
        return
    streak = f" ({state.nonfinite_streak + 1} in a row, run.on_nonfinite = skip)" if state.nonfinite_streak else ""
    raise DivergenceError(f"non-finite {what} at step {state.step + 1}{streak}")


def evaluate(backend, params):
    correct, loss_sum, n = backend.evaluate(params)
    return {"test_loss": loss_sum / n, "test_accuracy": correct / n}


class LocalBackend:
    """The whole data set in this process: the single-process trainer."""

    workers = 0

    def __init__(self, source, dtype=np.float32):
        self.dtype = np.dtype(dtype).type
        self.train_x, self.train_y = data.load_rows(source.train)
        self.test_x, self.test_y = data.load_rows(source.test)
        self.n_train, self.n_test = len(self.train_y), len(self.test_y)

    def grad_sums(self, params, batch, step=None):
        t0 = time.perf_counter()
        x, y = (self.train_x, self.train_y) if batch is None else (self.train_x[batch], self.train_y[batch])
        grads, loss_sum, count = mlp.loss_and_grad_sums(params, mlp.scale_pixels(x, self.dtype), y)
        return StepResult(grads, loss_sum, count, time.perf_counter() - t0)

    def evaluate(self, params):
        return mlp.evaluate_sums(params, mlp.scale_pixels(self.test_x, self.dtype), self.test_y)

    def close(self):
        pass
