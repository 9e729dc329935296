"""The NumPy core against two independent references: central finite differences in float64,
and the seed notebook's own loops (tests/seed_reference.py) on real digits.
"""

import copy
import random

import numpy as np
import pytest

import seed_reference as seed
from distmlp import data, mlp, optim

RTOL = 1e-6


@pytest.fixture(scope="module")
def digits():
    """The first 20 real training digits of mnist-sample: (uint8 (20, 784), labels (20,))."""
    return data.load_rows(data.resolve("mnist-sample").train, 0, 20)


@pytest.fixture(scope="module")
def start():
    """The seed's He initialisation (784-16-16-10), drawn by its own code from random.Random(7)."""
    return seed.fresh_weights_biases(random.Random(7))


def x64(x_uint8):
    return mlp.scale_pixels(x_uint8, np.float64)


def loss_sum(params, x, y):
    logits, _ = mlp.forward(params, x)
    return mlp.xent_loss_and_dlogits(logits, y)[0]


def central_difference(params, x, y, name, index, eps=1e-4):
    """d(loss sum)/d params[name][index] by (f(p + eps) - f(p - eps)) / 2 eps."""
    plus, minus = copy.deepcopy(params), copy.deepcopy(params)
    plus[name][index] += eps
    minus[name][index] -= eps
    return (loss_sum(plus, x, y) - loss_sum(minus, x, y)) / (2 * eps)


def fd_noise(params, x, y, eps=1e-4):
    """Rounding error of a central difference: ~10 ulp of the loss sum, over 2 eps."""
    return 10 * np.finfo(np.float64).eps * abs(loss_sum(params, x, y)) / (2 * eps)


def assert_close(actual, expected, rtol=RTOL, atol=0.0):
    """Elementwise relative match; entries ~0 in both are compared on 1e-10 of the array's scale."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = max(np.abs(expected).max(), 1e-300)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=max(atol, 1e-10 * scale))


# ------------------------------------------------------------------ finite differences


@pytest.mark.parametrize("sizes", [(6, 5, 4, 3), (20, 7, 5, 3), (12, 4), (9, 8, 7, 6, 5)])
def test_every_gradient_entry_matches_central_differences(sizes):
    rng = np.random.default_rng(len(sizes))
    params = mlp.init_params(sizes, rng, np.float64)
    params = {k: v + 0.1 * rng.standard_normal(v.shape) for k, v in params.items()}  # nonzero biases
    x = rng.standard_normal((7, sizes[0]))  # (B, in)
    y = rng.integers(0, sizes[-1], size=7)
    grads, _, count = mlp.loss_and_grad_sums(params, x, y)
    assert count == 7
    for name, p in params.items():
        fd = np.array([central_difference(params, x, y, name, i) for i in np.ndindex(p.shape)]).reshape(p.shape)
        assert_close(grads[name], fd, atol=fd_noise(params, x, y))


def test_784_16_16_10_gradients_on_real_digits_match_central_differences(digits, start):
    params = seed.to_params(start)
    x, y = x64(digits[0][:8]), digits[1][:8]
    grads, _, _ = mlp.loss_and_grad_sums(params, x, y)
    for name in ("b1", "W2", "b2", "W3", "b3"):
        fd = np.array([central_difference(params, x, y, name, i) for i in np.ndindex(params[name].shape)])
        assert_close(grads[name], fd.reshape(params[name].shape), atol=fd_noise(params, x, y))
    rng = np.random.default_rng(0)
    inked = np.flatnonzero(x.max(axis=0) > 0)  # pixels some digit uses: W1 columns with signal
    cols = np.concatenate([rng.choice(inked, 200, replace=False), rng.choice(784, 40, replace=False)])
    entries = [(int(r), int(c)) for r, c in zip(rng.integers(0, 16, len(cols)), cols)]
    fd = [central_difference(params, x, y, "W1", e) for e in entries]
    assert_close([grads["W1"][e] for e in entries], fd, atol=fd_noise(params, x, y))
    assert np.abs(fd).max() > 1e-3  # the subset is not all dead entries


# ------------------------------------------------------------------ the seed's loops


def test_forward_matches_seed_forward_pass(digits, start):
    params = seed.to_params(start)
    images = seed.images_from_uint8(digits[0][:5])
    logits, cache = mlp.forward(params, x64(digits[0][:5]))
    weights, biases = seed.unpack(start)
    for b, image in enumerate(images):
        h1, h2, out = seed.forward_pass(image, weights, biases)
        assert_close(cache[1][b], h1)
        assert_close(cache[2][b], h2)
        assert_close(logits[b], out)


def test_loss_and_output_deltas_match_seed_softmax(digits, start):
    params = seed.to_params(start)
    x, y = x64(digits[0][:5]), digits[1][:5]
    logits, _ = mlp.forward(params, x)
    loss, dlogits = mlp.xent_loss_and_dlogits(logits, y)
    seed_loss = 0.0
    for b in range(5):
        output_layer = seed.softmax(list(logits[b]))
        actual_output = [0] * len(output_layer)
        actual_output[y[b]] = 1
        assert_close(dlogits[b], [output_layer[i] - actual_output[i] for i in range(len(output_layer))])
        seed_loss -= np.log(output_layer[y[b]])
    assert loss == pytest.approx(seed_loss, rel=RTOL)


def test_pixels_scaled_as_seed(digits):
    np.testing.assert_array_equal(x64(digits[0][:3]), np.array(seed.images_from_uint8(digits[0][:3])))


def assert_same_update(before, ours, theirs):
    """Both the new weights and the update (new - old) agree to RTOL, array by array."""
    for name in before:
        assert_close(ours[name], theirs[name])
        assert_close(ours[name] - before[name], theirs[name] - before[name])


@pytest.mark.parametrize("lr", [0.001, 0.5])
def test_one_pass_of_seed_sgd_is_three_sequential_steps(digits, start, lr):
    x, y = digits[0][:3], digits[1][:3]
    before = seed.to_params(start)
    theirs = seed.to_params(seed.SGD(seed.images_from_uint8(x), list(y), *seed.unpack(copy.deepcopy(start)), lr))
    params, state = before, optim.init_state(before)
    for b in range(3):  # one example, one update: the seed's per-example SGD
        sums, _, count = mlp.loss_and_grad_sums(params, x64(x[b:b + 1]), y[b:b + 1])
        params, state = optim.step(params, optim.mean_grads(sums, count), state, lr)
    assert_same_update(before, params, theirs)


def test_one_batch_of_seed_sgd_minibatch(digits, start):
    x, y = digits
    batch = [13, 2, 7, 19, 0, 11]  # the "random.sample" draw, given
    before = seed.to_params(start)
    theirs = seed.SGD_minibatch(seed.images_from_uint8(x), list(y), *seed.unpack(copy.deepcopy(start)),
                                learning_rate=0.001, minibatch_size=len(batch), batches=1, batch_indices=[batch])
    sums, _, count = mlp.loss_and_grad_sums(before, x64(x[batch]), y[batch])
    params, _ = optim.step(before, optim.mean_grads(sums, count), {}, 0.001)
    assert_same_update(before, params, seed.to_params(theirs))


def test_seed_sgd_minibatch_draws_with_random_sample(digits, start):
    x, y = digits
    draws = random.Random(3).sample(range(20), 4)
    given = seed.SGD_minibatch(seed.images_from_uint8(x), list(y), *seed.unpack(copy.deepcopy(start)),
                               minibatch_size=4, batches=1, batch_indices=[draws])
    drawn = seed.SGD_minibatch(seed.images_from_uint8(x), list(y), *seed.unpack(copy.deepcopy(start)),
                               minibatch_size=4, batches=1, rng=random.Random(3))
    assert given == drawn


def test_one_epoch_of_seed_gd(digits, start):
    x, y = digits
    before = seed.to_params(start)
    theirs = seed.GD(seed.images_from_uint8(x), list(y), *seed.unpack(copy.deepcopy(start)), 0.05, epochs=1)
    sums, _, count = mlp.loss_and_grad_sums(before, x64(x), y)
    assert count == 20
    params, _ = optim.step(before, optim.mean_grads(sums, count), {}, 0.05)
    assert_same_update(before, params, seed.to_params(theirs))


def test_predict_and_accuracy_match_seed_test_neural_network(digits, start):
    x, y = digits
    weights, biases = seed.unpack(start)
    accuracy = seed.test_neural_network(seed.images_from_uint8(x), list(y), weights, biases)
    correct, _, n = mlp.evaluate_sums(seed.to_params(start), x64(x), y)
    assert correct / n * 100 == pytest.approx(accuracy)
    expected = [out.index(max(out)) for out in (seed.forward_pass(im, weights, biases)[2]
                                                 for im in seed.images_from_uint8(x))]
    np.testing.assert_array_equal(mlp.predict(seed.to_params(start), x64(x)), expected)


# ------------------------------------------------------------------ shapes, dtypes, sums


@pytest.mark.parametrize("sizes", [(784, 16, 16, 10), (784, 10), (20, 7, 5, 3), (3, 50, 2)])
def test_init_shapes_layout_and_he_scale(sizes):
    params = mlp.init_params(sizes, np.random.default_rng(0))
    assert list(params) == mlp.param_names(len(sizes) - 1)
    assert mlp.layer_sizes(params) == tuple(sizes)
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        assert params[f"W{i}"].shape == (fan_out, fan_in)  # the seed's weights[out][in]
        assert params[f"b{i}"].shape == (fan_out,) and not params[f"b{i}"].any()


def test_he_standard_deviation_is_sqrt_2_over_fan_in():
    w = mlp.init_params((400, 300, 10), np.random.default_rng(0), np.float64)["W1"]
    assert w.std() == pytest.approx(np.sqrt(2 / 400), rel=0.01)
    assert abs(w.mean()) < 0.01 * np.sqrt(2 / 400) * 10


def test_init_is_deterministic_in_the_generator_seed():
    a = mlp.init_params((784, 16, 16, 10), np.random.default_rng(5))
    b = mlp.init_params((784, 16, 16, 10), np.random.default_rng(5))
    c = mlp.init_params((784, 16, 16, 10), np.random.default_rng(6))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W1"], c["W1"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_end_to_end(digits, dtype):
    params = mlp.init_params((784, 16, 16, 10), np.random.default_rng(0), dtype)
    x = mlp.scale_pixels(digits[0], dtype)
    assert x.dtype == dtype
    logits, cache = mlp.forward(params, x)
    assert logits.dtype == dtype and all(a.dtype == dtype for a in cache)
    grads, loss, count = mlp.loss_and_grad_sums(params, x, digits[1])
    assert all(g.dtype == dtype for g in grads.values())
    new, _ = optim.step(params, optim.mean_grads(grads, count), {}, 0.1)
    assert all(p.dtype == dtype for p in new.values())
    assert np.isfinite(loss) and count == 20


def test_float32_is_the_default_and_agrees_with_float64(digits, start):
    params64 = seed.to_params(start)
    params32 = {k: v.astype(np.float32) for k, v in params64.items()}
    assert mlp.init_params((4, 3), np.random.default_rng(0))["W1"].dtype == np.float32
    assert mlp.scale_pixels(digits[0]).dtype == np.float32
    g32, l32, _ = mlp.loss_and_grad_sums(params32, mlp.scale_pixels(digits[0]), digits[1])
    g64, l64, _ = mlp.loss_and_grad_sums(params64, x64(digits[0]), digits[1])
    assert l32 == pytest.approx(l64, rel=1e-5)
    for name in g64:
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-5 * np.abs(g64[name]).max())


@pytest.mark.parametrize("split", [1, 7, 13, 19])
def test_gradient_sums_over_two_parts_equal_the_whole(digits, start, split):
    params, x, y = seed.to_params(start), x64(digits[0]), digits[1]
    whole, loss, n = mlp.loss_and_grad_sums(params, x, y)
    g1, l1, n1 = mlp.loss_and_grad_sums(params, x[:split], y[:split])
    g2, l2, n2 = mlp.loss_and_grad_sums(params, x[split:], y[split:])
    assert (n1, n2, n1 + n2) == (split, 20 - split, n)
    assert l1 + l2 == pytest.approx(loss, rel=1e-12)
    for name in whole:
        np.testing.assert_allclose(g1[name] + g2[name], whole[name], rtol=1e-12, atol=1e-14)


def test_softmax_is_stable_for_huge_logits():
    logits = np.array([[1000.0, 0.0, -1000.0], [5.0, 5.0, 5.0]])
    loss, dlogits = mlp.xent_loss_and_dlogits(logits, np.array([0, 2]))
    assert np.isfinite(loss) and loss == pytest.approx(np.log(3))
    np.testing.assert_allclose(dlogits, [[0, 0, 0], [1 / 3, 1 / 3, -2 / 3]], atol=1e-15)


def test_evaluate_sums_counts_correct_predictions():
    params = {"W1": np.eye(3), "b1": np.zeros(3)}
    x = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.0], [4.0, 0, 0]])
    correct, loss, n = mlp.evaluate_sums(params, x, np.array([0, 1, 0, 0]))
    assert (correct, n) == (3, 4) and loss > 0
