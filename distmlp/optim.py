"""Update rules on dicts of arrays. Pure: they return new dicts and never touch the inputs.

`grads` are already averaged (the driver divides the summed gradients by the example count).
The seed uses plain SGD, `w -= lr * grad`; momentum is the one extra rule offered.
"""

import numpy as np


def init_state(params, momentum=0.0):
    """Optimizer state for params: empty for plain SGD, a velocity per array for momentum."""
    if momentum == 0.0:
        return {}
    return {name: np.zeros_like(p) for name, p in params.items()}


def step(params, grads, state, lr, momentum=0.0):
    """One update. Returns (new params, new state)."""
    if momentum == 0.0:
        return {name: p - lr * grads[name] for name, p in params.items()}, state
    velocity = {name: momentum * state[name] + grads[name] for name in params}
    new_params = {name: p - lr * velocity[name] for name, p in params.items()}
    return new_params, velocity


def mean_grads(grad_sums, count):
    """Weighted mean of summed gradients: sum over every example divided by the count."""
    return {name: g / count for name, g in grad_sums.items()}


def add_into(total, part):
    """total += part, key by key (total is a dict the caller owns)."""
    for name, g in part.items():
        total[name] += g
    return total
