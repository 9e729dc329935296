"""The arithmetic contract of a training step: the rules every backend follows, so that all give the same bits.

    batch (sampling.Sampler, from (seed, step))
      -> the rows each worker owns (local_rows: contiguous ranges from data.shard_bounds)
      -> each worker's gradient sums over its rows, flattened (flatten)
      -> added in rank order, ranks without rows left out (add_in_rank_order)
      -> divided by the total count and applied by optim.update to one flat array of all
         weights (FlatWeights.apply); a step whose loss or new weights are not finite changes nothing

The actor transport (in the driver), the mesh (in every worker) and the single-process backend
all go through `apply_step`; nothing else adds partial sums or updates weights.
"""

import math

import numpy as np

from distmlp import mlp, optim
from distmlp.data import shard_bounds  # noqa: F401  (the row ranges workers own: part of this contract)


def local_rows(batch, bound):
    """The indices of batch inside the rows bound = (lo, hi), as row numbers from lo, in batch
    order; None (the whole shard) for a full-batch step."""
    if batch is None:
        return None
    lo, hi = bound
    return batch[(batch >= lo) & (batch < hi)] - lo


def shares(batch, bounds):
    """{rank: local rows} of the ranks that own rows of batch (every rank for a full batch)."""
    out = {}
    for rank, bound in enumerate(bounds):
        rows = local_rows(batch, bound)
        if rows is None or len(rows):
            out[rank] = rows
    return out


def flatten(arrays, names, out=None):
    """The arrays of a params-like dict, in names order, as one flat array (into out if given)."""
    return np.concatenate([arrays[name].reshape(-1) for name in names], out=out)


def unflatten(flat, params):
    """{name: view of flat} shaped like params' arrays: the inverse of flatten (param_names order)."""
    out, at = {}, 0
    for name in mlp.param_names(len(params) // 2):
        shape = params[name].shape
        out[name] = flat[at:at + params[name].size].reshape(shape)
        at += params[name].size
    return out


def all_finite(x):
    """No NaN or infinity in x (one sum, exact: a non-finite sum is checked element by element)."""
    return bool(np.isfinite(x.sum()) or np.isfinite(x).all())


def add_in_rank_order(parts, out):
    """out = parts[0] + parts[1] + ... added left to right: the one order of the sum."""
    np.copyto(out, parts[0])
    for part in parts[1:]:
        np.add(out, part, out=out)
    return out


class FlatWeights:
    """Weights (and momentum) as one flat array in param_names order, double-buffered: a step
    writes the other buffer, so a step that is not finite leaves the current weights untouched.
    update: a compiled version of apply's arithmetic with the same bits (kernels.NumbaKernel.update),
    or None for NumPy's."""

    def __init__(self, params, opt_state, momentum, update=None):
        self.names = mlp.param_names(len(params) // 2)
        flat = flatten(params, self.names)
        self.params = [flat, np.empty_like(flat)]
        self.velocity = [flatten(opt_state, self.names), np.empty_like(flat)] if opt_state else [None, None]
        self.views = [unflatten(buf, params) for buf in self.params]
        self.momentum, self.cur = momentum, 0
        self.total = np.empty_like(flat)  # the summed gradients of the step being applied
        self.update = update
        self.no_velocity = flat[:0]  # what update gets for the velocity without momentum

    def current(self):
        """{name: view} of the current weights (valid until the next apply)."""
        return self.views[self.cur]

    def state(self):
        """(params, opt_state) as fresh arrays keyed by name."""
        params = {name: a.copy() for name, a in self.current().items()}
        velocity = self.velocity[self.cur]
        if velocity is None:
            return params, {}
        return params, {name: a.copy() for name, a in unflatten(velocity, params).items()}

    def sum_of(self, grads):
        """The flat gradient sums grads (rank order) added: a lone part as it is (apply only reads
        it), else added into self.total. A read-only part is copied too: numba would compile its
        update again for a read-only array."""
        first = grads[0]
        if len(grads) == 1 and first.dtype == self.total.dtype and first.flags.writeable:
            return first
        return add_in_rank_order(grads, self.total)

    def apply(self, lr, count, total=None):
        """Update from the gradient sums in total (None: self.total) over count examples; total
        is only read (NumPy's arithmetic works in self.total). False (nothing changed) when the
        new weights or velocity are not finite."""
        cur, new = self.cur, 1 - self.cur
        total = self.total if total is None else total
        if self.update is not None:
            v, v_new = self.velocity[cur], self.velocity[new]
            if v is None:
                v = v_new = self.no_velocity
            if not self.update(self.params[cur], total, count, lr, self.momentum, self.params[new], v, v_new):
                return False
            self.cur = new
            return True
        with np.errstate(over="ignore", invalid="ignore"):  # checked below (its sums may overflow too)
            g = np.divide(total, count, out=self.total)  # optim.mean_grads
            optim.update(self.params[cur], g, self.velocity[cur], lr, self.momentum,
                         self.params[new], self.velocity[new], scratch=g)
            if not all_finite(self.params[new]) or (self.velocity[new] is not None and not all_finite(self.velocity[new])):
                return False
        self.cur = new
        return True


def apply_step(weights, parts, lr):
    """Add the parts [(rank, flat gradient sums, loss sum, count)] (rank order, ranks with rows
    only) and apply the step to weights; (loss sum, count, None) when applied, else
    (loss sum, count, cause) with cause from nonfinite_cause."""
    loss_sum, count = 0.0, 0
    for _, _, part_loss, part_count in parts:
        loss_sum += part_loss
        count += part_count
    total = weights.sum_of([grads for _, grads, _, _ in parts])
    if math.isfinite(loss_sum) and weights.apply(lr, count, total):
        return loss_sum, count, None
    return loss_sum, count, nonfinite_cause(parts)


def nonfinite_cause(parts):
    """What made a step non-finite: ("loss or gradient", rank of the first non-finite part or
    None) when the summed loss or gradient is not finite, else ("update", None): finite
    gradients whose update overflowed the weights."""
    total = add_in_rank_order([grads for _, grads, _, _ in parts], np.empty_like(parts[0][1]))
    if math.isfinite(sum(loss for _, _, loss, _ in parts)) and all_finite(total):
        return "update", None
    bad = [rank for rank, grads, loss, _ in parts if not (math.isfinite(loss) and all_finite(grads))]
    return "loss or gradient", (bad[0] if bad else None)
