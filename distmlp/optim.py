"""Update rules. `update` is the rule on arrays (one per parameter, or one flat array of all);
`step` applies it to dicts of arrays and never touches its inputs.

`grads` are already averaged (the gradient sums divided by the example count). The seed uses
plain SGD, `w -= lr * grad`; momentum (heavy ball) is the one extra rule offered.
"""

import numpy as np


def init_state(params, momentum=0.0):
    """Optimizer state for params: empty for plain SGD, a velocity per array for momentum."""
    if momentum == 0.0:
        return {}
    return {name: np.zeros_like(p) for name, p in params.items()}


def update(p, g, v, lr, momentum, p_out, v_out=None, scratch=None):
    """p_out = p - lr * g (plain SGD), or v_out = momentum * v + g; p_out = p - lr * v_out.

    Elementwise, so one flat array of every weight gets the same bits as one array per name.
    scratch (shape of p) may be g itself when the caller no longer needs it.
    """
    scratch = np.empty_like(p) if scratch is None else scratch
    if momentum == 0.0:
        np.subtract(p, np.multiply(g, lr, out=scratch), out=p_out)
        return
    np.add(np.multiply(v, momentum, out=v_out), g, out=v_out)
    np.subtract(p, np.multiply(v_out, lr, out=scratch), out=p_out)


def step(params, grads, state, lr, momentum=0.0):
    """One update of dicts of arrays. Returns (new params, new state)."""
    new_params = {name: np.empty_like(p) for name, p in params.items()}
    new_state = {name: np.empty_like(p) for name, p in state.items()} if momentum else state
    for name, p in params.items():
        update(p, grads[name], state.get(name), lr, momentum, new_params[name], new_state.get(name))
    return new_params, new_state


def mean_grads(grad_sums, count):
    """Weighted mean of summed gradients: sum over every example divided by the count."""
    return {name: g / count for name, g in grad_sums.items()}
