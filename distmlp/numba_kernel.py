"""The compiled minibatch kernel (model.kernel = "numba"): gather, scale, forward, softmax
cross-entropy and backward in one loop, no NumPy call per layer.

Imported only by distmlp.kernels when a job asks for it, so importing distmlp never imports
numba. Compiled on first call for each (dtype, index type) and cached on disk (cache=True:
next to this file, or in the user's cache directory or NUMBA_CACHE_DIR where the package is
not writable), so worker processes load the machine code instead of compiling it again.

The fastmath flags allow reassociation (so the dot products vectorize) and contraction into
fused multiply-adds, but not the assumption that values are finite: a NaN or an overflow still
reaches the loss and gradient, where the divergence check sees it.
"""

import numba
import numpy as np

FASTMATH = {"reassoc", "nsz", "contract"}


@numba.njit(fastmath=FASTMATH, cache=True)
def grad_sums(flat, sizes, table, x_uint8, labels, rows, out):
    """Write the gradient sums over x_uint8[rows] into out (flat, in flat's layout: W1 (out, in),
    b1, W2, ...) for the weights flat; the loss sum. table: the 256 scaled pixel values."""
    n_layers = len(sizes) - 1
    batch = len(rows)
    zero = table[0]
    out[:] = zero
    offsets = np.empty(n_layers + 1, np.int64)  # where W_i starts; b_i follows it
    widest = 1
    at = 0
    for i in range(n_layers):
        offsets[i] = at
        at += sizes[i + 1] * sizes[i] + sizes[i + 1]
        widest = max(widest, sizes[i + 1])
    offsets[n_layers] = at
    x = np.empty((batch, sizes[0]), table.dtype)
    for r in range(batch):
        row = x_uint8[rows[r]]
        for j in range(sizes[0]):
            x[r, j] = table[row[j]]
    acts = np.empty((n_layers, batch, widest), table.dtype)  # acts[i]: layer i+1's output
    for i in range(n_layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        w = flat[offsets[i]:offsets[i] + n_out * n_in].reshape((n_out, n_in))
        b = flat[offsets[i] + n_out * n_in:offsets[i + 1]]
        for r in range(batch):
            a = x[r] if i == 0 else acts[i - 1, r, :n_in]
            for o in range(n_out):
                s = zero
                for j in range(n_in):
                    s += a[j] * w[o, j]
                s += b[o]
                if i < n_layers - 1 and s < zero:
                    s = zero
                acts[i, r, o] = s
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
        for r in range(batch):
            a = x[r] if i == 0 else acts[i - 1, r, :n_in]
            for o in range(n_out):
                d = delta[r, o]
                gb[o] += d
                for j in range(n_in):
                    gw[o, j] += d * a[j]
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
