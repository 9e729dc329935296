"""The gradient-sum kernels (model.kernel): the one function every backend calls for a step's sums.

    kernel.grad_sums(params, x_uint8, labels, rows, out) -> (loss sum, count)

writes the gradient sums over the uint8 rows x_uint8[rows] (rows None: every row) into out,
flat in step.flatten's layout. The single-process backend, the workers' actor calls, the mesh
and the collective all reach it through ShardWorker.grad_sums or LocalBackend.grad_sums, so a
job's kernel is the same in every transport and their bits stay equal.

"numpy" is the reference: mlp.loss_and_grad_sums on the scaled rows. "numba" runs a minibatch
through one compiled loop (distmlp.numba_kernel); its sums are added in another order than
BLAS adds them, so they equal the reference within rounding, not bit for bit, and they are the
same bits in every process only on the same CPU type (LLVM compiles for the host CPU). A full
batch (gd) goes through the NumPy path in both kernels, CHUNK_ROWS rows at a time: there BLAS
is faster than the compiled loop. A kernel also evaluates the held-out rows (held_out): numba by
its forward pass on the uint8 rows, so every transport's evaluations are the same bits too.
"""

import os
import tempfile

import numpy as np

from distmlp import fsutil, mlp, step
from distmlp.errors import UserError

CHUNK_ROWS = 512  # full-batch rows per chunk: (512, 784) float32 is 1.6 MB, near a core's 1 MB L2


class NumpyKernel:
    update = None  # a compiled step.FlatWeights update (same bits as NumPy's), or None: NumPy's
    prefetch = None  # prefetch(x_uint8, rows): start loading the next step's rows, or None

    def __init__(self, dtype, chunk_rows=CHUNK_ROWS):
        self.dtype = np.dtype(dtype).type
        self.chunk_rows = chunk_rows  # a full batch's rows per chunk (None: all in one pass)
        self.layout, self.out, self.views = None, None, None  # keyed_grad_sums' array, made once
        self.scaled = None  # a full batch's chunk of scaled rows, made once

    def grad_sums(self, params, x_uint8, labels, rows, out):
        if rows is None:
            grads, loss_sum, count = chunked_grad_sums(params, x_uint8, labels, self.dtype, self.chunk_rows,
                                                       self._scaled(x_uint8.shape[1]))
        else:
            x = mlp.scale_pixels(x_uint8[rows], self.dtype)  # (B, 784)
            grads, loss_sum, count = mlp.loss_and_grad_sums(params, x, labels[rows])
        step.flatten(grads, mlp.param_names(len(params) // 2), out=out)
        return loss_sum, count

    def chunk_sums(self, params, x_uint8, labels):
        """(gradient sums, loss sum) of one chunk of a full batch, as grad_sums computes each
        (the mesh shares a full batch's chunks among the workers of a node)."""
        return chunk_grad_sums(params, x_uint8, labels, self.dtype, self._scaled(x_uint8.shape[1]))

    def _scaled(self, width):
        if self.chunk_rows and self.scaled is None:
            self.scaled = np.empty((self.chunk_rows, width), self.dtype)
        return self.scaled

    def held_out(self, x_uint8, labels):
        """The held-out rows as this kernel evaluates them: held_out(...).evaluate(params) ->
        (number correct, loss sum, count)."""
        return mlp.HeldOut(x_uint8, labels, self.dtype)

    def keyed_grad_sums(self, params, x_uint8, labels, rows):
        """(gradient sums keyed like params, loss sum, count) by grad_sums; the sums are views of
        one flat array that the next call rewrites."""
        layout = tuple(p.shape for p in params.values())
        if layout != self.layout:
            self.out = np.empty(sum(p.size for p in params.values()), self.dtype)
            self.layout, self.views = layout, step.unflatten(self.out, params)
        loss_sum, count = self.grad_sums(params, x_uint8, labels, rows, self.out)
        return self.views, loss_sum, count

    def flat_sums(self, grads, names, out=None):
        """grads as one flat array in names order (into out if given): keyed_grad_sums' views
        are of one already (copied whole), any other dict is flattened (step.flatten)."""
        if grads is not self.views:
            return step.flatten(grads, names, out=out)
        if out is None:
            return self.out
        np.copyto(out, self.out)
        return out


class NumbaKernel(NumpyKernel):
    def __init__(self, dtype, chunk_rows=CHUNK_ROWS):
        super().__init__(dtype, chunk_rows)
        compiled = _compiled()
        self.compiled, self.update, self.prefetch = compiled.grad_sums, compiled.update, compiled.prefetch_rows
        self.compiled_evaluate = compiled.evaluate_sums
        self.table = mlp.scale_pixels(np.arange(256, dtype=np.uint8), self.dtype)  # pixel -> its scaled value
        self.flat, self.sizes = None, None  # the weights flattened for the compiled loop; the layer widths
        self.bases = {}  # id(params dict) -> (the dict, the flat array its arrays are views of, or None)

    def grad_sums(self, params, x_uint8, labels, rows, out):
        if rows is None:
            return super().grad_sums(params, x_uint8, labels, rows, out)
        if self.flat is None or self.flat.shape != out.shape:
            self.flat = np.empty_like(out)
            self.sizes = np.array(mlp.layer_sizes(params), np.int64)
            self.bases.clear()
        flat = self._flat_base(params)
        if flat is None:
            flat = step.flatten(params, mlp.param_names(len(params) // 2), out=self.flat)
        return self.compiled(flat, self.sizes, self.table, x_uint8, labels, rows, out), len(rows)

    def held_out(self, x_uint8, labels):
        return CompiledHeldOut(self.compiled_evaluate, self.table, x_uint8, labels)

    def _flat_base(self, params):
        """flat_base(params), looked up once per params dict (step.FlatWeights hands out the same
        two dicts of views step after step)."""
        known = self.bases.get(id(params))
        if known is None or known[0] is not params:
            if len(self.bases) > 8:
                self.bases.clear()
            known = self.bases[id(params)] = (params, flat_base(params, self.flat.size))
        return known[1]


class CompiledHeldOut:
    """The held-out rows evaluated by the numba kernel's forward pass, read as uint8 (a quarter
    of the memory traffic of scaled floats) without the GIL (the single-process backend
    evaluates in a thread beside the steps, and NumPy's elementwise calls held the GIL there)."""

    def __init__(self, evaluate_sums, table, x_uint8, labels):
        self.evaluate_sums, self.table, self.x, self.labels = evaluate_sums, table, x_uint8, labels

    def evaluate(self, params):
        names = mlp.param_names(len(params) // 2)
        flat = step.flatten(params, names)  # its own array: an evaluation may run beside a step
        sizes = np.array(mlp.layer_sizes(params), np.int64)
        correct, loss_sum = self.evaluate_sums(flat, sizes, self.table, self.x, self.labels)
        return int(correct), float(loss_sum), len(self.labels)


def flat_base(params, size):
    """The one flat array that params' arrays are consecutive views of in param_names order
    (step.FlatWeights holds the weights so), else None; then it is what step.flatten would make."""
    first = params["W1"]
    base = first.base
    if not isinstance(base, np.ndarray) or base.ndim != 1 or base.size != size or base.dtype != first.dtype or not base.flags.c_contiguous:
        return None
    at = base.ctypes.data
    for name in mlp.param_names(len(params) // 2):
        a = params[name]
        if a.base is not base or a.ctypes.data != at or not a.flags.c_contiguous:
            return None
        at += a.nbytes
    return base


def _compiled():
    """The module numba_kernel, its functions compiled once per machine: numba caches it beside the module, else
    in the user's cache directory; where neither is writable, in a private directory of this
    user's under the temporary directory."""
    try:
        from distmlp import numba_kernel
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        import numba
        path = os.path.join(tempfile.gettempdir(), f"distmlp-numba-{os.getuid()}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        fsutil.check_private_dir(path)  # numba loads pickles from it
        numba.config.CACHE_DIR = path
        from distmlp import numba_kernel
    return numba_kernel


def require(name):
    """Raise UserError (one line) when kernel `name` cannot run here: call before starting Ray."""
    if name == "numba":
        try:
            import numba  # noqa: F401
        except ImportError:
            raise UserError("model.kernel: \"numba\" needs numba, the extra 'fast' "
                            "(pip install -e '.[fast]')") from None


def make(name, dtype, chunk_rows=CHUNK_ROWS):
    """The kernel called `name` (config.KERNELS) for weights of dtype."""
    require(name)
    return (NumbaKernel if name == "numba" else NumpyKernel)(dtype, chunk_rows)


def chunked_grad_sums(params, x_uint8, labels, dtype, chunk=CHUNK_ROWS, scaled=None):
    """mlp.loss_and_grad_sums over uint8 rows, `chunk` rows at a time (None: all at once),
    partial sums added in order; each chunk scaled into `scaled` ((chunk, 784) floats) if given.

    A full-batch step over 30,000 rows scaled at once writes and rereads 94 MB of floats; in
    chunks that fit a core's own cache the floats stay there, and workers on one node do not
    compete for the shared L3. One buffer reused for every chunk spares the allocator handing
    pages back and faulting them in again (docs/performance.md).
    """
    total, loss_sum = None, 0.0
    chunk = chunk or len(labels)
    for lo in range(0, len(labels), chunk):
        grads, part_loss = chunk_grad_sums(params, x_uint8[lo:lo + chunk], labels[lo:lo + chunk], dtype, scaled)
        total = add_sums(total, grads)
        loss_sum += part_loss
    return total, loss_sum, len(labels)


def chunk_grad_sums(params, x_uint8, labels, dtype, scaled=None):
    """(gradient sums, loss sum) of one chunk of uint8 rows, scaled into `scaled` if given."""
    x = mlp.scale_pixels(x_uint8, dtype, None if scaled is None else scaled[:len(x_uint8)])  # (chunk, 784)
    grads, loss_sum, _ = mlp.loss_and_grad_sums(params, x, labels)
    return grads, loss_sum


def add_sums(total, grads):
    """The running sum of chunked sums: grads added into total (total None: grads is the sum)."""
    if total is None:
        return grads
    for name, g in grads.items():
        total[name] += g
    return total
