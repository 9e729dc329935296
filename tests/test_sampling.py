"""The sampler: batches are a pure function of (seed, step), whatever came before."""

import numpy as np
import pytest

from distmlp import config, trainer
from distmlp.sampling import Sampler


@pytest.mark.parametrize("sampling", ["shuffle", "sample", "sequential"])
def test_batch_depends_only_on_seed_and_step(sampling):
    a = Sampler("minibatch", 100, 8, sampling, seed=3)
    b = Sampler("minibatch", 100, 8, sampling, seed=3)
    forward = [a.batch(s) for s in range(40)]
    backward = [b.batch(s) for s in reversed(range(40))][::-1]  # replayed in another order
    for x, y in zip(forward, backward):
        np.testing.assert_array_equal(x, y)
    assert all(x.dtype.kind == "i" for x in forward)
    assert all(len(x) == 8 for x in forward)


@pytest.mark.parametrize("sampling", ["shuffle", "sample"])
def test_different_seeds_give_different_batches(sampling):
    a = [Sampler("minibatch", 100, 8, sampling, seed=0).batch(s) for s in range(5)]
    b = [Sampler("minibatch", 100, 8, sampling, seed=1).batch(s) for s in range(5)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_shuffle_covers_every_index_once_per_epoch():
    n, batch = 103, 10  # 10 steps an epoch; the 3 left over are dropped
    s = Sampler("minibatch", n, batch, "shuffle", seed=5)
    assert s.steps_per_epoch == 10
    epochs = []
    for epoch in range(3):
        seen = np.concatenate([s.batch(epoch * 10 + k) for k in range(10)])
        assert len(seen) == len(set(seen.tolist())) == 100
        assert seen.min() >= 0 and seen.max() < n
        epochs.append(seen)
    assert not np.array_equal(epochs[0], epochs[1])  # a fresh permutation each epoch


def test_shuffle_epoch_with_no_remainder_is_a_permutation():
    s = Sampler("minibatch", 64, 8, "shuffle", seed=2)
    seen = np.concatenate([s.batch(k) for k in range(8, 16)])  # epoch 1
    np.testing.assert_array_equal(np.sort(seen), np.arange(64))


def test_sample_has_no_repeats_within_a_batch_and_varies_across_batches():
    s = Sampler("minibatch", 40, 32, "sample", seed=0)
    batches = [s.batch(k) for k in range(50)]
    for b in batches:
        assert len(set(b.tolist())) == 32 and b.min() >= 0 and b.max() < 40
    assert len({tuple(b.tolist()) for b in batches}) == 50


def test_sequential_walks_the_data_in_order():
    s = Sampler("minibatch", 10, 3, "sequential")
    assert [s.batch(k).tolist() for k in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 2]]
    sgd = Sampler("sgd", 4, 32, "sequential")
    assert sgd.batch_size == 1 and sgd.steps_per_epoch == 4
    assert [sgd.batch(k).tolist() for k in range(5)] == [[0], [1], [2], [3], [0]]


def test_sgd_shuffle_visits_each_example_once_per_epoch():
    s = Sampler("sgd", 12, sampling="shuffle", seed=4)
    seen = [int(s.batch(k)[0]) for k in range(12)]
    assert sorted(seen) == list(range(12))


def test_gd_returns_none_for_the_whole_data_set():
    s = Sampler("gd", 500, 32, "sample", seed=0)
    assert s.steps_per_epoch == 1 and s.batch_size == 500
    assert all(s.batch(k) is None for k in range(3))


def test_epoch_of_step():
    s = Sampler("minibatch", 100, 25, "shuffle")
    assert [s.epoch_of(k) for k in (0, 3, 4, 9)] == [0, 0, 1, 2]


def test_batch_larger_than_the_data_set_is_refused():
    with pytest.raises(ValueError, match="optimizer.batch_size: 33 is larger than the 32"):
        Sampler("minibatch", 32, 33)
    Sampler("minibatch", 32, 32)  # exactly the data set is fine


def test_trainer_refuses_a_batch_larger_than_the_data_set_with_a_config_error():
    job = config.load_job(None, ["optimizer.batch_size=64"])
    with pytest.raises(config.ConfigError, match="optimizer.batch_size: 64"):
        trainer.make_sampler(job, 50)


def test_state_names_everything_that_fixes_future_batches():
    s = Sampler("minibatch", 100, 8, "sample", seed=9)
    assert s.state() == {"kind": "counter-based", "seed": 9, "sampling": "sample", "batch_size": 8, "n": 100}
