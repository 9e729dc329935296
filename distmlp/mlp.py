"""The model: a ReLU MLP as pure functions on NumPy arrays.

Parameters are a dict {"W1", "b1", ..., "WL", "bL"} with W of shape (out, in), the seed
notebook's `weights[out][in]` layout. Gradients come back keyed like the parameters and
summed (not averaged) over the examples given, so partial sums from several workers can be
added and divided once by the total count.
"""

import numpy as np

DEFAULT_SIZES = (784, 16, 16, 10)


def param_names(n_layers):
    """["W1", "b1", "W2", "b2", ...] for a model with n_layers weight layers."""
    return [f"{kind}{i}" for i in range(1, n_layers + 1) for kind in ("W", "b")]


def init_params(sizes, rng, dtype=np.float32):
    """He initialisation as in the seed: W ~ N(0, sqrt(2 / fan_in)), biases zero."""
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        std = np.sqrt(2.0 / fan_in)
        params[f"W{i}"] = rng.normal(0.0, std, size=(fan_out, fan_in)).astype(dtype)
        params[f"b{i}"] = np.zeros(fan_out, dtype=dtype)
    return params


def layer_sizes(params):
    """The layer widths, input first, read off the weight shapes."""
    n_layers = len(params) // 2
    sizes = [params["W1"].shape[1]]
    sizes += [params[f"W{i}"].shape[0] for i in range(1, n_layers + 1)]
    return tuple(sizes)


def scale_pixels(x_uint8, dtype=np.float32, out=None):
    """uint8 pixels -> floats in [0, 1], the seed's `pixel / 255.0` (into out if given)."""
    return np.divide(x_uint8, dtype(255), out=out, dtype=dtype)  # each pixel cast exactly, then divided


def forward(params, x):
    """x: (B, in) floats -> (logits (B, out), cache of the activations)."""
    n_layers = len(params) // 2
    activations = [x]
    a = x
    for i in range(1, n_layers + 1):
        z = a @ params[f"W{i}"].T + params[f"b{i}"]  # (B, out_i)
        a = z if i == n_layers else np.maximum(z, 0)
        activations.append(a)
    return a, activations


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def xent_loss_and_dlogits(logits, labels):
    """Softmax cross-entropy summed over the batch, and its gradient per example.

    dlogits is the seed's `output - one_hot(label)`, one row per example (not averaged).
    """
    shifted = logits - logits.max(axis=1, keepdims=True)  # (B, out)
    e = np.exp(shifted)
    z = e.sum(axis=1)  # (B,)
    rows = np.arange(len(labels))
    loss_sum = float(np.sum(np.log(z) - shifted[rows, labels]))
    dlogits = e / z[:, None]  # softmax(logits), computed once
    dlogits[rows, labels] -= 1
    return loss_sum, dlogits


def backward(params, cache, dlogits):
    """Gradients of the summed loss for every weight and bias, keyed like params."""
    n_layers = len(params) // 2
    grads = {}
    delta = dlogits  # (B, out_L)
    for i in range(n_layers, 0, -1):
        a_prev = cache[i - 1]  # (B, in_i)
        grads[f"W{i}"] = delta.T @ a_prev  # (out_i, in_i)
        grads[f"b{i}"] = delta.sum(axis=0)  # (out_i,)
        if i > 1:
            delta = (delta @ params[f"W{i}"]) * (a_prev > 0)  # (B, in_i)
    return {name: grads[name] for name in param_names(n_layers)}


def loss_and_grad_sums(params, x, labels):
    """(grads summed over the batch, loss sum, count) for floats x (B, in) and int labels (B,)."""
    logits, cache = forward(params, x)
    loss_sum, dlogits = xent_loss_and_dlogits(logits, labels)
    return backward(params, cache, dlogits), loss_sum, len(labels)


def predict(params, x):
    logits, _ = forward(params, x)
    return logits.argmax(axis=1)


EVAL_CHUNK_ROWS = 512  # rows per forward pass of an evaluation: its activations stay in the core's cache


def xent_loss_sum(logits, labels):
    """The loss sum of xent_loss_and_dlogits (the same bits), without the gradient."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return float(np.sum(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(len(labels)), labels]))


def evaluate_sums(params, x, labels, chunk_rows=EVAL_CHUNK_ROWS):
    """(number correct, loss sum, count): sums, so shards can be added; chunk_rows rows at a
    time, the loss sums of the chunks added in order."""
    correct, loss_sum = 0, 0.0
    for lo in range(0, len(labels), chunk_rows):
        logits, _ = forward(params, x[lo:lo + chunk_rows])
        part = labels[lo:lo + chunk_rows]
        loss_sum += xent_loss_sum(logits, part)
        correct += int(np.sum(logits.argmax(axis=1) == part))
    return correct, loss_sum, len(labels)


class HeldOut:
    """Held-out rows scaled to floats once (uint8 -> float is most of an evaluation's time), so
    that each evaluation is one forward pass; evaluate gives evaluate_sums over them."""

    def __init__(self, x_uint8, labels, dtype=np.float32):
        self.x, self.labels = scale_pixels(x_uint8, dtype), labels

    def evaluate(self, params):
        return evaluate_sums(params, self.x, self.labels)
