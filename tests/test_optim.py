"""Update rules: plain SGD is the seed's `w -= lr * grad`; momentum is heavy-ball; all pure."""

import numpy as np
import pytest

from distmlp import optim


def params_and_grads():
    rng = np.random.default_rng(0)
    params = {"W1": rng.standard_normal((4, 3)), "b1": rng.standard_normal(4)}
    grads = {"W1": rng.standard_normal((4, 3)), "b1": rng.standard_normal(4)}
    return params, grads


def test_sgd_is_w_minus_lr_grad_elementwise():
    params, grads = params_and_grads()
    new, state = optim.step(params, grads, optim.init_state(params), 0.05)
    assert state == {}
    for name in params:
        for i in np.ndindex(params[name].shape):
            assert new[name][i] == params[name][i] - 0.05 * grads[name][i]


def test_step_never_touches_its_inputs():
    params, grads = params_and_grads()
    kept = {k: v.copy() for k, v in params.items()}
    kept_grads = {k: v.copy() for k, v in grads.items()}
    state = optim.init_state(params, 0.9)
    optim.step(params, grads, state, 0.1, 0.9)
    optim.step(params, grads, {}, 0.1)
    assert all(np.array_equal(params[k], kept[k]) and np.array_equal(grads[k], kept_grads[k]) for k in params)
    assert all(not v.any() for v in state.values())


def test_momentum_is_heavy_ball_over_three_steps():
    """v <- mu v + g; w <- w - lr v, checked against the closed form for constant gradients."""
    params, grads = params_and_grads()
    lr, mu = 0.1, 0.9
    state = optim.init_state(params, mu)
    assert set(state) == set(params) and all(not v.any() for v in state.values())
    p = params
    for _ in range(3):
        p, state = optim.step(p, grads, state, lr, mu)
    for name in params:
        velocity = (1 + mu + mu ** 2) * grads[name]
        np.testing.assert_allclose(state[name], velocity, rtol=1e-15)
        np.testing.assert_allclose(p[name], params[name] - lr * (3 + 2 * mu + mu ** 2) * grads[name], rtol=1e-14)


def test_zero_momentum_is_plain_sgd():
    params, grads = params_and_grads()
    a, _ = optim.step(params, grads, optim.init_state(params, 0.0), 0.3, 0.0)
    b = {k: params[k] - 0.3 * grads[k] for k in params}
    assert all(np.array_equal(a[k], b[k]) for k in params)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_keeps_the_dtype(dtype):
    params = {"W1": np.ones((2, 2), dtype), "b1": np.zeros(2, dtype)}
    grads = {k: np.full_like(v, 0.5) for k, v in params.items()}
    for momentum in (0.0, 0.5):
        new, state = optim.step(params, grads, optim.init_state(params, momentum), 0.1, momentum)
        assert all(v.dtype == dtype for v in new.values())
        assert all(v.dtype == dtype for v in state.values())


def test_mean_grads_divides_sums_by_the_total_count():
    sums = {"W1": np.array([[3.0, 6.0]]), "b1": np.array([9.0])}
    mean = optim.mean_grads(sums, 3)
    np.testing.assert_array_equal(mean["W1"], [[1.0, 2.0]])
    np.testing.assert_array_equal(mean["b1"], [3.0])


def test_weighted_mean_of_unequal_parts_equals_the_mean_over_all_examples():
    """Workers with 3 and 5 examples: (sum1 + sum2) / 8, not the mean of the two means."""
    rng = np.random.default_rng(1)
    per_example = rng.standard_normal((8, 4))
    total = {"b1": per_example[:3].sum(axis=0) + per_example[3:].sum(axis=0)}
    np.testing.assert_allclose(optim.mean_grads(total, 8)["b1"], per_example.mean(axis=0), rtol=1e-14)


def test_update_on_one_flat_array_equals_step_on_a_dict_bit_for_bit():
    params, grads = params_and_grads()
    for momentum in (0.0, 0.9):
        state = {k: v * 0.5 for k, v in grads.items()} if momentum else {}
        new, new_state = optim.step(params, grads, state, 0.1, momentum)
        flat = lambda d: np.concatenate([d[k].ravel() for k in ("W1", "b1")])  # noqa: E731
        p_out, v_out = np.empty(16), np.empty(16)
        optim.update(flat(params), flat(grads), flat(state) if momentum else None, 0.1, momentum, p_out,
                     v_out if momentum else None)
        assert p_out.tobytes() == flat(new).tobytes()
        if momentum:
            assert v_out.tobytes() == flat(new_state).tobytes()
