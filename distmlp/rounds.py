"""A worker's round of steps, shared by the mesh (mesh.py, one node) and the collective
transport (collective.py, across nodes).

Each worker holds the weights, draws every step's global batch from the same counter-based
sampler as the driver, computes the gradient sums of its own rows (ShardWorker.grad_sums),
exchanges them with the other workers over a link, and applies step.apply_step to the parts in
rank order: every worker holds the same bits, equal to the actor transport's. A link is the
mesh's shared memory (mesh.Peers) or Ray's allgather (collective.Group); it has

    buffer(step)              where this worker writes its sums for step
    exchange(step, header)    every worker's header (step, loss sum, count, last) by rank
    parts(step, headers)      [(rank, sums, loss sum, count)] of the ranks with rows, rank order

Where the run evaluates (request["eval_every"], ["steps"]: trainer.evaluation_due), every worker
evaluates its shard of the held-out split on the weights it holds, inside the round.
A round ends after request["stop"], after rank 0 has run round_s seconds (it says so in the
header of the step, so all stop after the same step), at a step whose sum or update is not
finite (not applied; the training loop applies its policy), or when the link breaks.
"""

import functools
import time

import numpy as np

from distmlp import step as contract
from distmlp.trainer import evaluation_due

OK, NONFINITE, BROKEN = "ok", "nonfinite", "broken"


class RoundWorker:
    """The round loop of one ShardWorker over a link that subclasses make (join) and drop."""

    join_errors = ()  # what join raises when the link cannot be made
    broken = Exception  # what the link raises when it breaks during a round
    join_prefix = ""  # before the join error in the reply's detail
    shared = None  # what shares a full batch's work among the workers (mesh.SharedBatch), if anything

    def __init__(self, worker):
        self.worker = worker

    def join(self, request, n_items, dtype):
        """The link for request's generation of workers (made, or kept from the last round)."""
        raise NotImplementedError

    def drop(self):
        """Close the link after it broke."""
        raise NotImplementedError

    def run(self, start, request):
        """Run steps [first, stop) from start = (params, opt_state); a dict for the driver."""
        r, w = request, self.worker
        params, opt_state = start
        weights = contract.FlatWeights(params, opt_state, r["momentum"], w.kernel.update)
        try:
            link = self.join(r, weights.total.size, weights.total.dtype)
        except self.join_errors as e:
            return {"status": BROKEN, "steps": [], "detail": f"{self.join_prefix}{e}", "step": r["first"]}
        sampler = r["sampler"]
        records, status, detail, nonfinite, evals, eval_s = [], OK, None, None, [], 0.0
        round_end = time.perf_counter() + r["round_s"]
        step = r["first"]
        following = contract.local_rows(sampler.batch(step), w.train_range)
        while step < r["stop"]:
            t0 = time.perf_counter()
            local = following
            count, loss_sum, compute_s = 0, 0.0, 0.0
            try:
                if local is None or len(local):
                    _, grads, loss_sum, count, compute_s = w.grad_sums(weights.current(), local, step, self.shared)
                    w.kernel.flat_sums(grads, weights.names, out=link.buffer(step))
                following = contract.local_rows(sampler.batch(step + 1), w.train_range)  # drawn once, used next step
                if following is not None and w.kernel.prefetch is not None:  # loads while the peers exchange
                    w.kernel.prefetch(w.train_x, following)
                last = int(step + 1 == r["stop"] or (w.rank == 0 and time.perf_counter() >= round_end))
                headers = link.exchange(step, (loss_sum, count, last))
            except self.broken as e:
                status, detail = BROKEN, str(e)
                self.drop()
                break
            total_loss, total_count, cause = contract.apply_step(weights, link.parts(step, headers), r["lr"])
            if cause is not None:  # not applied: every worker stops here, the loop applies its policy
                status, nonfinite = NONFINITE, (total_loss, total_count, *cause)
                break
            records.append((total_loss, total_count, compute_s, time.perf_counter() - t0))
            step += 1
            if evaluation_due(step, r["eval_every"], r["steps"]):
                eval_start = time.perf_counter()
                evals.append((step, *w.evaluate(weights.current())))
                eval_s += time.perf_counter() - eval_start
            if headers[0][3]:
                break
        out = {"status": status, "step": step, "detail": detail, "steps": records, "nonfinite": nonfinite,
               "evals": evals, "eval_s": eval_s, "fingerprint": fingerprint(weights.current())}
        if w.rank == 0:
            out["params"], out["opt_state"] = weights.state()
        return out


def fingerprint(params):
    """64-bit linear hash of the weights' bits: a different bit anywhere changes it."""
    blob = b"".join(np.ascontiguousarray(params[name]).tobytes() for name in sorted(params))
    words = np.frombuffer(blob + b"\0" * (-len(blob) % 8), np.uint64)
    return int(np.dot(words, _multipliers(len(words))))  # integer dot: wraps modulo 2**64


@functools.cache
def _multipliers(n):
    """n fixed odd 64-bit constants (the same in every process)."""
    return np.random.default_rng(0x5EED).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
