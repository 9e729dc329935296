"""The compiled minibatch kernel (model.kernel = "numba"): gather, scale, forward, softmax
cross-entropy and backward in one loop, no NumPy call per layer.

Imported only by distmlp.kernels when a job asks for it, so importing distmlp never imports
numba. Compiled on first call for each (dtype, index type) and cached on disk (cache=True:
next to this file, or in the user's cache directory or NUMBA_CACHE_DIR where the package is
not writable), so worker processes load the machine code instead of compiling it again.

Rows go through the layers four at a time (the remainder one by one): each weight read from
cache serves four rows in the forward pass, and each gradient entry is read and written once per
four rows in the backward pass, which took a batch of 32 from about 130 to 80 us here.

A step's rows are random among all the training rows, so its gather waits on memory (a batch of
32 took 70 us from random rows and 46 from rows already in the cache); prefetch_rows asks the CPU
to start loading the next step's rows (the sampler knows them) before this step returns.

The compiled functions let go of the GIL (nogil): the single-process backend evaluates in a
thread of its own beside the steps, and a step that held the GIL for its whole kernel made that
thread wait for Python's 5 ms switch interval at every turn (one evaluation took 450 ms instead
of 15). evaluate_sums evaluates the held-out rows by the same forward pass, from the uint8 rows
(a quarter of the memory traffic of floats scaled once) and without the GIL: NumPy's evaluation,
run beside the steps, slowed them by holding the GIL in its elementwise calls and by streaming
the scaled rows through the memory both cores share.

The fastmath flags allow reassociation (so the dot products vectorize) and contraction into
fused multiply-adds, but not the assumption that values are finite: a NaN or an overflow still
reaches the loss and gradient, where the divergence check sees it.
"""

import numba
import numpy as np
from llvmlite import ir
from numba.core import cgutils
from numba.extending import intrinsic

FASTMATH = {"reassoc", "nsz", "contract"}
CACHE_LINE = 64  # bytes


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to bring array[index]'s cache line in (LLVM's prefetch: read, keep in every
    cache level); it reads nothing and changes nothing, so no value can depend on it."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, [args[1]])
        byte_pointer = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # named for the pointer type as this llvmlite spells it ("p0", or "p0i8" before opaque pointers)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [byte_pointer],
                                              ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(pointer, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return numba.types.void(array, index), codegen


@numba.njit(cache=True, nogil=True)
def prefetch_rows(x_uint8, rows):
    """Start loading the rows x_uint8[rows] into the cache and return at once: the next step's
    batch, asked for at the end of this step, is then in the cache when its gather reads it
    (random rows of a large data set otherwise wait on memory, row by row)."""
    for r in range(len(rows)):
        row = x_uint8[rows[r]]
        for j in range(0, len(row), CACHE_LINE):
            _prefetch(row, j)


@numba.njit(inline="always", cache=True)
def layer_input(x, acts, i, r, n_in):
    """Row r's input to layer i: its scaled pixels (i = 0), else the layer below's activations."""
    return x[r] if i == 0 else acts[i - 1, r, :n_in]


@numba.njit(cache=True)
def layout(sizes):
    """(where W_i starts in the flat weights, for each layer and one past the last; the widest
    layer's width): b_i follows W_i."""
    n_layers = len(sizes) - 1
    offsets = np.empty(n_layers + 1, np.int64)
    widest = 1
    at = 0
    for i in range(n_layers):
        offsets[i] = at
        at += sizes[i + 1] * sizes[i] + sizes[i + 1]
        widest = max(widest, sizes[i + 1])
    offsets[n_layers] = at
    return offsets, widest


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def forward(flat, sizes, offsets, zero, x, acts, batch):
    """acts[i, :batch, :sizes[i + 1]] = layer i+1's output for the scaled rows x[:batch] (the last
    layer's: the logits), for the weights flat (offsets: layout's); zero: 0 of the weights' type."""
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        w = flat[offsets[i]:offsets[i] + n_out * n_in].reshape((n_out, n_in))
        b = flat[offsets[i] + n_out * n_in:offsets[i + 1]]
        r = 0
        while r + 4 <= batch:
            a0, a1 = layer_input(x, acts, i, r, n_in), layer_input(x, acts, i, r + 1, n_in)
            a2, a3 = layer_input(x, acts, i, r + 2, n_in), layer_input(x, acts, i, r + 3, n_in)
            for o in range(n_out):
                s0 = zero
                s1 = zero
                s2 = zero
                s3 = zero
                for j in range(n_in):
                    wj = w[o, j]
                    s0 += a0[j] * wj
                    s1 += a1[j] * wj
                    s2 += a2[j] * wj
                    s3 += a3[j] * wj
                s0 += b[o]
                s1 += b[o]
                s2 += b[o]
                s3 += b[o]
                if i < n_layers - 1:  # ReLU by comparison, so a NaN stays NaN
                    if s0 < zero:
                        s0 = zero
                    if s1 < zero:
                        s1 = zero
                    if s2 < zero:
                        s2 = zero
                    if s3 < zero:
                        s3 = zero
                acts[i, r, o] = s0
                acts[i, r + 1, o] = s1
                acts[i, r + 2, o] = s2
                acts[i, r + 3, o] = s3
            r += 4
        while r < batch:
            a = layer_input(x, acts, i, r, n_in)
            for o in range(n_out):
                s = zero
                for j in range(n_in):
                    s += a[j] * w[o, j]
                s += b[o]
                if i < n_layers - 1 and s < zero:
                    s = zero
                acts[i, r, o] = s
            r += 1


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def grad_sums(flat, sizes, table, x_uint8, labels, rows, out):
    """Write the gradient sums over x_uint8[rows] into out (flat, in flat's layout: W1 (out, in),
    b1, W2, ...) for the weights flat; the loss sum. table: the 256 scaled pixel values."""
    n_layers = len(sizes) - 1
    batch = len(rows)
    zero = table[0]
    out[:] = zero
    offsets, widest = layout(sizes)
    x = np.empty((batch, sizes[0]), table.dtype)
    for r in range(batch):
        row = x_uint8[rows[r]]
        for j in range(sizes[0]):
            x[r, j] = table[row[j]]
    acts = np.empty((n_layers, batch, widest), table.dtype)  # acts[i]: layer i+1's output
    forward(flat, sizes, offsets, zero, x, acts, batch)
    n_classes = sizes[n_layers]
    logits = acts[n_layers - 1]
    delta = np.empty((batch, widest), table.dtype)  # dloss/dz of the layer being differentiated
    loss_sum = 0.0
    for r in range(batch):
        label = labels[rows[r]]
        top = logits[r, 0]
        for o in range(n_classes):
            top = max(top, logits[r, o])
        z = zero
        for o in range(n_classes):
            e = np.exp(logits[r, o] - top)
            delta[r, o] = e
            z += e
        loss_sum += np.log(z) - (logits[r, label] - top)
        for o in range(n_classes):
            delta[r, o] /= z
        delta[r, label] -= 1
    below = np.empty((batch, widest), table.dtype)
    for i in range(n_layers - 1, -1, -1):
        n_in, n_out = sizes[i], sizes[i + 1]
        gw = out[offsets[i]:offsets[i] + n_out * n_in].reshape((n_out, n_in))
        gb = out[offsets[i] + n_out * n_in:offsets[i + 1]]
        w = flat[offsets[i]:offsets[i] + n_out * n_in].reshape((n_out, n_in))
        for o in range(n_out):
            for r in range(batch):
                gb[o] += delta[r, o]
        r = 0
        while r + 4 <= batch:
            a0, a1 = layer_input(x, acts, i, r, n_in), layer_input(x, acts, i, r + 1, n_in)
            a2, a3 = layer_input(x, acts, i, r + 2, n_in), layer_input(x, acts, i, r + 3, n_in)
            for o in range(n_out):
                d0, d1, d2, d3 = delta[r, o], delta[r + 1, o], delta[r + 2, o], delta[r + 3, o]
                for j in range(n_in):
                    gw[o, j] += d0 * a0[j] + d1 * a1[j] + d2 * a2[j] + d3 * a3[j]
            r += 4
        while r < batch:
            a = layer_input(x, acts, i, r, n_in)
            for o in range(n_out):
                d = delta[r, o]
                for j in range(n_in):
                    gw[o, j] += d * a[j]
            r += 1
        if i > 0:
            for r in range(batch):
                for j in range(n_in):
                    s = zero
                    if acts[i - 1, r, j] > zero:
                        for o in range(n_out):
                            s += delta[r, o] * w[o, j]
                    below[r, j] = s
            delta, below = below, delta
    return loss_sum


EVAL_BLOCK_ROWS = 64  # rows scaled and sent through the layers at a time: (64, 784) floats stay in a core's cache


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def evaluate_sums(flat, sizes, table, x_uint8, labels):
    """(number of rows whose largest logit is at their label, loss sum) over all of x_uint8, by
    the forward pass of grad_sums, EVAL_BLOCK_ROWS rows at a time; the loss as grad_sums adds it.
    The first largest logit counts, and a NaN is the largest (NumPy's argmax)."""
    n_layers = len(sizes) - 1
    n_rows = len(labels)
    zero = table[0]
    offsets, widest = layout(sizes)
    x = np.empty((EVAL_BLOCK_ROWS, sizes[0]), table.dtype)
    acts = np.empty((n_layers, EVAL_BLOCK_ROWS, widest), table.dtype)
    n_classes = sizes[n_layers]
    correct = 0
    loss_sum = 0.0
    for lo in range(0, n_rows, EVAL_BLOCK_ROWS):
        block = min(EVAL_BLOCK_ROWS, n_rows - lo)
        for r in range(block):
            row = x_uint8[lo + r]
            for j in range(sizes[0]):
                x[r, j] = table[row[j]]
        forward(flat, sizes, offsets, zero, x, acts, block)
        logits = acts[n_layers - 1]
        for r in range(block):
            label = labels[lo + r]
            best = 0
            for o in range(1, n_classes):
                if logits[r, o] > logits[r, best] or (np.isnan(logits[r, o]) and not np.isnan(logits[r, best])):
                    best = o
            top = logits[r, 0]
            for o in range(n_classes):
                top = max(top, logits[r, o])
            z = zero
            for o in range(n_classes):
                z += np.exp(logits[r, o] - top)
            loss_sum += np.log(z) - (logits[r, label] - top)
            if best == label:
                correct += 1
    return correct, loss_sum


@numba.njit(cache=True, nogil=True)
def update(p, total, count, lr, momentum, p_new, v, v_new):
    """step.FlatWeights.apply's arithmetic in one loop, operation for operation as NumPy does it
    (no fastmath: every operation rounds as NumPy's does, so the bits are the same): g = total /
    count; v_new = momentum * v + g (momentum only); p_new = p - lr * (v_new or g). total is
    only read (it may be a worker's gradient sums). True when every new weight and velocity is
    finite."""
    c = p.dtype.type(count)
    rate = p.dtype.type(lr)
    mu = p.dtype.type(momentum)
    finite = True
    for k in range(p.size):
        g = total[k] / c
        if v.size:
            g = v[k] * mu + g
            v_new[k] = g
            if not np.isfinite(g):
                finite = False
        q = p[k] - g * rate
        p_new[k] = q
        if not np.isfinite(q):
            finite = False
    return finite
