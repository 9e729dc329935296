"""The training loop, and the single-process backend it runs on without Ray.

A backend runs rounds of steps: `run_steps(state, stop, plan)` computes steps state.step.. (up
to stop, maybe fewer) by the contract in distmlp.step and returns a Round of typed step
records and the weights after its last step, with the evaluations due inside it (a backend
evaluates the weights where they are, so a round need not end for an evaluation). The loop
turns records into metrics, applies the divergence policy and calls the hooks; it has no other
path. LocalBackend here
holds the whole data set in this process and is the reference distributed runs are tested
against; the Ray transports are in distmlp.transport.
"""

import gc
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from distmlp import data, kernels, mlp, optim, step
from distmlp.config import ConfigError
from distmlp.errors import RunStopped
from distmlp.sampling import Sampler

ROUND_S = 0.5  # a round of steps ends after about this long, so the loop reports progress
MAX_SKIPPED = 3  # on_nonfinite = "skip": the run stops at the third non-finite step in a row


class DivergenceError(RunStopped, RuntimeError):
    """A non-finite loss, gradient or update; names the step (and the worker when known)."""


@dataclass
class TrainState:
    params: dict
    opt_state: dict
    step: int = 0  # optimizer steps done
    samples_seen: int = 0
    nonfinite_streak: int = 0  # consecutive skipped updates (on_nonfinite = "skip")
    metrics: dict = field(default_factory=dict)  # the latest step record


@dataclass(frozen=True)
class Plan:
    """What a backend needs to compute steps: the batches, the update rule's constants."""

    sampler: Sampler
    lr: float
    momentum: float
    eval_every: int = 0  # evaluate after every eval_every-th step (0: only after the last)
    steps: int = 0  # the run's last step (always evaluated)

    def evaluates(self, done):
        """Whether the held-out split is evaluated after `done` steps."""
        return evaluation_due(done, self.eval_every, self.steps)


def evaluation_due(done, eval_every, steps):
    """Whether a run of `steps` steps evaluating every `eval_every` evaluates after `done` steps;
    workers running rounds themselves (distmlp.rounds) ask the same."""
    return done == steps or bool(eval_every) and done % eval_every == 0


class StepRecord(NamedTuple):  # a tuple: one is made per step, and a frozen dataclass costs twice as much
    loss_sum: float
    count: int  # examples in the step
    compute_s: float  # the slowest worker's time computing its gradient sums
    step_s: float  # wall time of the step, the round's overhead spread over its steps


@dataclass(frozen=True)
class NonFinite:
    """The step after a round's last one could not be applied: its loss or update is not finite."""

    loss_sum: float
    count: int
    what: str  # "loss or gradient" or "update"
    worker: str | None = None  # "1 (pid 1234)": the first worker whose part was not finite


@dataclass(frozen=True)
class Round:
    steps: list  # [StepRecord], one per step applied
    params: dict  # the weights after the last applied step
    opt_state: dict
    nonfinite: NonFinite | None = None
    evals: dict = field(default_factory=dict)  # {steps done: (correct, loss sum, count)} due in the round


class Steps:
    """The records of consecutive steps as columns: what the loop hands its hooks after a round
    (Hook.on_steps). columns: {name: NumPy array, one entry a step} for COLUMNS; tests: {index:
    (test_loss, test_accuracy)} of the evaluated steps. records() gives the same steps as the
    per-step dicts of Hook.on_step (made once, shared by every hook that asks)."""

    COLUMNS = ("step", "epoch", "samples_seen", "train_loss", "lr", "step_s", "compute_s", "comm_s")

    def __init__(self, columns, tests):
        self.columns, self.tests = columns, tests
        self._records = None

    def __len__(self):
        return len(self.columns["step"])

    def records(self):
        """[record] in step order: flat dicts of Python numbers, test_loss and test_accuracy on
        the evaluated steps."""
        if self._records is None:
            columns = (self.columns[name].tolist() for name in self.COLUMNS)
            # a dict display per step: twice as fast as dict(zip(COLUMNS, row))
            self._records = [{"step": step, "epoch": epoch, "samples_seen": seen, "train_loss": loss, "lr": lr,
                              "step_s": step_s, "compute_s": compute_s, "comm_s": comm_s}
                             for step, epoch, seen, loss, lr, step_s, compute_s, comm_s in zip(*columns)]
            for i, (loss, accuracy) in self.tests.items():
                self._records[i].update(test_loss=loss, test_accuracy=accuracy)
        return self._records

    def record(self, i):
        """The i-th step's record alone (records()[i], without making the others)."""
        if self._records is not None:
            return self._records[i]
        record = {name: self.columns[name][i].item() for name in self.COLUMNS}
        if i % len(self) in self.tests:
            loss, accuracy = self.tests[i % len(self)]
            record.update(test_loss=loss, test_accuracy=accuracy)
        return record

    @classmethod
    def from_records(cls, records):
        """Steps of records (dicts with COLUMNS, test_loss and test_accuracy where evaluated)."""
        columns = {name: np.array([r[name] for r in records]) for name in cls.COLUMNS}
        tests = {i: (r["test_loss"], r["test_accuracy"]) for i, r in enumerate(records)
                 if r.get("test_accuracy") is not None}
        return cls(columns, tests)


class Hook:
    """A training-loop hook that does nothing: subclasses override what they need.

    on_start(state, info); on_steps(state, steps) after every round of steps (steps: Steps, the
    round's records as columns), whose default calls on_step(state, record) for each of its
    records (a flat dict) with state's step and samples_seen at that record; on_end(state,
    record); next_stop(step): the first step after `step` at which the hook needs state.params
    (rounds of steps end there), or None. The hooks see a round one after another, in order.
    """

    def on_start(self, state, info):
        pass

    def on_steps(self, state, steps):
        end = state.step, state.samples_seen, state.metrics
        try:
            for record in steps.records():
                state.step, state.samples_seen, state.metrics = record["step"], record["samples_seen"], record
                self.on_step(state, record)
        finally:
            state.step, state.samples_seen, state.metrics = end

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
        raise ConfigError(f"optimizer.batch_size: {o.batch_size} is larger than the {n_train} training examples")
    return Sampler(o.name, n_train, o.batch_size, o.sampling_mode, job.run.seed)


def total_steps(job, sampler):
    if job.run.steps is not None:
        return job.run.steps
    return (job.run.epochs or 1) * sampler.steps_per_epoch


def train(job, backend, state=None, hooks=()):
    """Run job on backend from state (a fresh start when None); returns the final TrainState."""
    state = state or initial_state(job)
    sampler = make_sampler(job, backend.n_train)
    steps = total_steps(job, sampler)
    plan = Plan(sampler, job.optimizer.learning_rate, job.optimizer.momentum, job.run.eval_every or 0, steps)
    info = {"steps": steps, "steps_per_epoch": sampler.steps_per_epoch, "workers": backend.workers,
            "n_train": backend.n_train, "n_test": backend.n_test}
    for hook in hooks:
        hook.on_start(state, info)
    # The loop makes objects for every step (records, rows, events), so the collector runs often,
    # and a full collection walked every object made before the loop (Ray's, the libraries'),
    # which live as long as the run, while the workers waited for the next round: frozen, they
    # are left out of the loop's collections.
    gc.freeze()
    try:
        while state.step < steps:
            done = backend.run_steps(state, next_stop(state.step, steps, hooks), plan)
            state.params, state.opt_state = done.params, done.opt_state
            if done.steps:
                state.nonfinite_streak = 0
                hand_over(state, round_steps(job, plan, state, done.steps, done.evals), hooks)
            if done.nonfinite is not None:
                _skip_or_stop(job, state, done.nonfinite)
                bad = done.nonfinite
                # the round ended at the skipped step, so state.params are the weights to evaluate there
                evals = {state.step + 1: backend.evaluate(state.params)} if plan.evaluates(state.step + 1) else {}
                skipped = [StepRecord(bad.loss_sum, bad.count, 0.0, 0.0)]
                hand_over(state, round_steps(job, plan, state, skipped, evals), hooks)
    finally:
        gc.unfreeze()
    for hook in hooks:
        hook.on_end(state, state.metrics)
    return state


def round_steps(job, plan, state, records, evals):
    """The Steps of records ([StepRecord]), the steps after state.step, with the evaluations
    due among them from evals ({steps done: (correct, loss sum, count)})."""
    loss_sum, count, compute_s, step_s = (np.array(c) for c in zip(*records))
    step = np.arange(state.step + 1, state.step + len(records) + 1)
    columns = {"step": step, "epoch": step / plan.sampler.steps_per_epoch,
               "samples_seen": state.samples_seen + np.cumsum(count), "train_loss": loss_sum / count,
               "lr": np.full(len(records), job.optimizer.learning_rate, np.float64), "step_s": step_s,
               "compute_s": compute_s, "comm_s": np.maximum(step_s - compute_s, 0.0)}
    tests = {}
    for done in evaluated(state.step, int(step[-1]), plan):
        if done not in evals:
            raise RuntimeError(f"the backend did not evaluate the weights after step {done}")
        correct, loss, n = evals[done]
        tests[done - state.step - 1] = (loss / n, correct / n)
    return Steps(columns, tests)


def evaluated(first, last, plan):
    """The steps in (first, last] after which plan evaluates, in order."""
    return [done for done in range(first + 1, last + 1) if plan.evaluates(done)]


def hand_over(state, steps, hooks):
    """Count steps done and hand them to the hooks, one hook after another."""
    state.step = int(steps.columns["step"][-1])
    state.samples_seen = int(steps.columns["samples_seen"][-1])
    state.metrics = steps.record(-1)
    for hook in hooks:
        hook.on_steps(state, steps)


def next_stop(step, steps, hooks):
    """The first step after `step` at which the loop needs the weights: the end, or a hook's
    next_stop(step) (checkpoints; test hooks acting between steps)."""
    stops = [steps]
    stops += [at for hook in hooks if (at := hook.next_stop(step)) is not None]
    return min(stops)


def _skip_or_stop(job, state, bad):
    """Skip the update (policy "skip", fewer than MAX_SKIPPED in a row) or raise DivergenceError."""
    if job.run.on_nonfinite == "skip" and state.nonfinite_streak < MAX_SKIPPED - 1:
        state.nonfinite_streak += 1
        return
    what = ("update (finite gradient, overflowing weights)" if bad.what == "update"
            else "loss or gradient" + (f" in worker {bad.worker}" if bad.worker else ""))
    streak = f" ({state.nonfinite_streak + 1} in a row, run.on_nonfinite = skip)" if state.nonfinite_streak else ""
    raise DivergenceError(f"non-finite {what} at step {state.step + 1}{streak}")


def run_round(state, stop, plan, compute, evaluate, update=None):
    """Steps state.step.. up to stop (or until ROUND_S has passed) in one process, each by
    compute(step, params) -> ([(rank, flat gradient sums, loss sum, count)], compute seconds,
    {rank: worker description}), evaluating by evaluate(params) where plan says; a Round. The
    driver side of the actor transport and the single-process backend both run their steps here.
    evaluate may return a concurrent.futures.Future; the round waits for it at its end. update:
    step.FlatWeights' compiled update, if any."""
    weights = step.FlatWeights(state.params, state.opt_state, plan.momentum, update)
    records, nonfinite, evals = [], None, {}
    round_end = time.perf_counter() + ROUND_S
    for at in range(state.step, stop):
        t0 = time.perf_counter()
        parts, compute_s, workers = compute(at, weights.current())
        loss_sum, count, cause = step.apply_step(weights, parts, plan.lr)
        if cause is not None:
            what, rank = cause
            nonfinite = NonFinite(loss_sum, count, what, workers.get(rank))
            break
        records.append(StepRecord(loss_sum, count, compute_s, time.perf_counter() - t0))
        if plan.evaluates(at + 1):
            evals[at + 1] = evaluate(weights.current())
        if time.perf_counter() >= round_end:
            break
    params, opt_state = weights.state()
    evals = {done: e.result() if isinstance(e, Future) else e for done, e in evals.items()}
    return Round(records, params, opt_state, nonfinite, evals)


class LocalBackend:
    """The whole data set in this process: the single-process trainer."""

    workers = 0

    def __init__(self, source, dtype=np.float32, kernel="numpy"):
        self.dtype = np.dtype(dtype).type
        self.kernel = kernels.make(kernel, dtype, chunk_rows=None)  # a full batch in one pass
        self.train_x, self.train_y = data.load_rows(source.train)
        self.test_x, self.test_y = data.load_rows(source.test)
        self.n_train, self.n_test = len(self.train_y), len(self.test_y)
        self.held_out = self.kernel.held_out(self.test_x, self.test_y)
        self._evaluator = None  # the thread evaluate_later runs in, started on first use

    def grad_sums(self, params, batch, step_index):
        """(gradient sums keyed like params, loss sum, count) over batch (None: every row); the
        sums are rewritten by the next call."""
        return self.kernel.keyed_grad_sums(params, self.train_x, self.train_y, batch)

    def run_steps(self, state, stop, plan):
        names = mlp.param_names(len(state.params) // 2)

        drawn = {}  # {step: its batch} drawn by the step before it, for the prefetch

        def compute(at, params):
            t0 = time.perf_counter()
            batch = drawn.pop(at) if at in drawn else plan.sampler.batch(at)
            grads, loss_sum, count = self.grad_sums(params, batch, at)
            if batch is not None and self.kernel.prefetch is not None:
                drawn[at + 1] = plan.sampler.batch(at + 1)
                self.kernel.prefetch(self.train_x, drawn[at + 1])
            return [(0, self.kernel.flat_sums(grads, names), loss_sum, count)], time.perf_counter() - t0, {}
        return run_round(state, stop, plan, compute, self.evaluate_later, self.kernel.update)

    def evaluate(self, params):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):  # also in the evaluation thread
            return self.held_out.evaluate(params)

    def evaluate_later(self, params):
        """evaluate(a copy of params) in a thread of its own, a Future: BLAS lets go of the GIL,
        so the evaluation runs beside the next steps, on the core the steps leave idle. The same
        function on the same bits: the result does not depend on when it runs."""
        if self._evaluator is None:
            self._evaluator = ThreadPoolExecutor(1, thread_name_prefix="distmlp-evaluate")
        return self._evaluator.submit(self.evaluate, {name: a.copy() for name, a in params.items()})

    def close(self):
        if self._evaluator is not None:
            self._evaluator.shutdown()
            self._evaluator = None
