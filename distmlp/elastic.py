"""Elastic training: keep going on the workers that are left, grow back when capacity returns.

A step's global batch comes from (seed, step) and its arithmetic (distmlp.step) depends only on
the number of workers, so a step that failed can be computed again by a smaller group. When
lost workers cannot be replaced within cluster.replace_timeout_s, ElasticBackend starts a new
group of the workers that are left (each loads only the rows it now owns, split exactly as a
fresh run of that size splits them) and computes the failed round again: no step is lost and
none is restarted from a checkpoint. At round boundaries, at most every GROW_CHECK_S, it looks
for room for more workers (up to cluster.workers) and regroups to use it. Below
cluster.min_workers the run stops (group.WorkerFailure).
"""

import math
import time

import ray

from distmlp import config, transport
from distmlp.connect import ClusterError
from distmlp.group import Unreplaceable, WorkerFailure

GROW_CHECK_S = 5.0  # how often (at most, between rounds) to look for room for more workers
FIRST_PLACE_S = 5.0  # how long to wait for every worker asked for before starting with fewer


class ElasticBackend:
    """A transport whose worker count moves between cluster.min_workers and cluster.workers."""

    def __init__(self, source, job, on_change=lambda event: None, start=None):
        start = start or transport.start  # looked up now: tests replace transport.start
        self.source, self.job, self.on_change, self._start = source, job, on_change, start
        c = job.cluster
        self.most, self.least = c.workers, c.min_workers or c.workers
        if self.least == self.most:
            self.inner = start(source, job)
        else:
            try:
                self.inner = start(source, job, place_timeout_s=FIRST_PLACE_S)
            except ClusterError:  # not every worker fits yet: start with what fits, at least min_workers
                self.inner = start(source, self._sized(min(max(self._room(0), self.least), self.most)))
        self.failures = 0  # spent by groups before the current one
        self._at = 0  # the step the weights are at (for a change during an evaluation)
        self._next_check = time.monotonic() + GROW_CHECK_S

    @property
    def group(self):
        return self.inner.group

    @property
    def workers(self):
        return self.inner.workers

    @property
    def n_train(self):
        return self.inner.n_train

    @property
    def n_test(self):
        return self.inner.n_test

    def run_steps(self, state, stop, plan):
        self._maybe_grow(state.step)
        while True:
            try:
                done = self.inner.run_steps(state, stop, plan)
                self._at = state.step + len(done.steps)
                return done
            except Unreplaceable as e:  # the round is computed again by the workers that are left
                self._shrink(state.step, e)

    def evaluate(self, params):
        while True:
            try:
                return self.inner.evaluate(params)
            except Unreplaceable as e:
                self._shrink(self._at, e)

    def close(self):
        self.inner.close()

    def _sized(self, workers):
        return config.replace(self.job, cluster={"workers": workers, "min_workers": None})

    def _room(self, have):
        """How many workers the cluster's free CPUs hold besides the `have` running ones."""
        free = ray.available_resources().get("CPU", 0.0)
        return have + int(math.floor(free / self.job.cluster.cpus_per_worker + 1e-9))

    def _regroup(self, step, workers, why):
        """Replace the group by a fresh one of `workers` workers; report the change."""
        t0, before = time.perf_counter(), self.inner.workers
        self.failures += self.inner.group.failures
        self.inner.close()
        self.inner = self._start(self.source, self._sized(workers))
        self.inner.group.failures = self.failures  # one budget for the whole run
        self.on_change({"event": "membership", "step": step, "workers_before": before, "workers_after": workers,
                        "nodes": len(self.inner.group.nodes()), "seconds": time.perf_counter() - t0, "why": why})

    def _shrink(self, step, lost):
        left = self.inner.workers - len(lost.ranks)
        if left < self.least:
            raise WorkerFailure(f"{left} worker(s) left, cluster.min_workers is {self.least}: {lost}") from None
        self._regroup(step, left, f"lost worker(s) {', '.join(map(str, lost.ranks))}")

    def _maybe_grow(self, step):
        now = time.monotonic()
        if self.inner.workers >= self.most or now < self._next_check:
            return
        self._next_check = now + GROW_CHECK_S
        want = min(self.most, self._room(self.inner.workers))
        if want > self.inner.workers:
            self._regroup(step, want, "capacity returned")
