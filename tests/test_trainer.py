"""The single-process trainer: reproducible, learns, and is exactly the seed's loops on real digits."""

import copy
import dataclasses
import time

import numpy as np
import pytest

import seed_reference as seed
from distmlp import config, data, mlp, optim, trainer

SEED_RUNS = {  # the seed's three optimizers at its learning rates, a few hundred examples each
    "sgd": ["optimizer.name=sgd", "optimizer.lr=0.001", "run.steps=300"],
    "minibatch-shuffle": ["optimizer.name=minibatch", "optimizer.lr=0.001", "optimizer.batch_size=32",
                          "optimizer.sampling=shuffle", "run.steps=260"],  # crosses an epoch (250 steps)
    "minibatch-sample": ["optimizer.name=minibatch", "optimizer.lr=0.001", "optimizer.batch_size=32",
                         "optimizer.sampling=sample", "run.steps=60"],
    "gd": ["optimizer.name=gd", "optimizer.lr=0.05", "run.steps=3"],
}


@pytest.fixture(scope="module")
def sample():
    return data.resolve("mnist-sample")


@pytest.fixture(scope="module")
def backend(sample):
    """mnist-sample in this process: 8,000 training and 2,000 held-out digits, float32."""
    return trainer.LocalBackend(sample)


@pytest.fixture(scope="module")
def tiny(sample):
    """The first 20 training and 50 held-out digits, float64: small enough for the seed's loops."""
    source = dataclasses.replace(sample, train=dataclasses.replace(sample.train, count=20),
                                 test=dataclasses.replace(sample.test, count=50))
    return trainer.LocalBackend(source, np.float64)


def run(backend, overrides, state=None):
    return trainer.train(config.load_job(None, overrides), backend, state)


def same(a, b):
    return all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("name", SEED_RUNS)
def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(backend, name):
    first = run(backend, SEED_RUNS[name] + ["run.seed=11"])
    second = run(backend, SEED_RUNS[name] + ["run.seed=11"])
    other = run(backend, SEED_RUNS[name] + ["run.seed=12"])
    assert first.step == second.step == int(SEED_RUNS[name][-1].split("=")[1])
    assert same(first.params, second.params)
    assert first.metrics["test_accuracy"] == second.metrics["test_accuracy"]
    assert not np.array_equal(first.params["W1"], other.params["W1"])


@pytest.mark.parametrize("sampling", ["shuffle", "sample"])
def test_the_sampling_seed_alone_changes_the_path(backend, sampling):
    """Same initial weights, different seed: only the batches differ, and so do the weights."""
    base = SEED_RUNS[f"minibatch-{sampling}"][:-1] + ["run.steps=20"]
    start = trainer.initial_state(config.load_job(None, base + ["run.seed=0"]))
    a = run(backend, base + ["run.seed=0"], copy.deepcopy(start))
    b = run(backend, base + ["run.seed=1"], copy.deepcopy(start))
    assert not np.array_equal(a.params["W1"], b.params["W1"])


def test_minibatch_lr_0_1_reaches_90_percent_on_mnist_sample(backend, record_property):
    t0 = time.perf_counter()
    state = run(backend, ["optimizer.name=minibatch", "optimizer.lr=0.1", "optimizer.batch_size=32",
                          "run.epochs=5", "run.seed=0"])
    seconds = time.perf_counter() - t0
    accuracy = state.metrics["test_accuracy"]
    record_property("heldout_accuracy", accuracy)
    record_property("train_seconds", seconds)
    print(f"minibatch lr 0.1 batch 32, 5 epochs (1250 steps): held-out {accuracy:.2%} in {seconds:.2f} s")
    assert state.step == 5 * 250 and state.samples_seen == 1250 * 32
    assert accuracy >= 0.90


def test_final_metrics_are_the_held_out_evaluation_of_the_final_weights(backend):
    state = run(backend, SEED_RUNS["gd"])
    correct, loss_sum, n = mlp.evaluate_sums(state.params, mlp.scale_pixels(backend.test_x), backend.test_y)
    assert n == 2000
    assert state.metrics["test_accuracy"] == correct / n
    assert state.metrics["test_loss"] == pytest.approx(loss_sum / n)
    assert state.metrics["step"] == 3 and state.samples_seen == 3 * 8000


# ------------------------------------------------------------ against the seed's loops


def seed_start(job):
    """The trainer's initial weights as the seed's dict of lists (the trainer draws them)."""
    return seed.from_params(trainer.initial_state(job).params)


def assert_matches_seed(before, ours, theirs, rtol=1e-6):
    for name in ours:
        scale = np.abs(theirs[name] - before[name]).max()
        np.testing.assert_allclose(ours[name], theirs[name], rtol=rtol)
        np.testing.assert_allclose(ours[name] - before[name], theirs[name] - before[name],
                                   rtol=rtol, atol=1e-10 * scale)


def tiny_images(tiny):
    return seed.images_from_uint8(tiny.train_x), list(tiny.train_y)


def test_sequential_sgd_epoch_is_the_seed_sgd(tiny):
    job = config.load_job(None, ["optimizer.name=sgd", "optimizer.lr=0.01", "optimizer.sampling=sequential",
                                 "model.dtype=float64", "run.epochs=1", "run.seed=3"])
    start = seed_start(job)
    state = trainer.train(job, tiny)
    assert state.step == 20
    theirs = seed.SGD(*tiny_images(tiny), *seed.unpack(copy.deepcopy(start)), learning_rate=0.01)
    assert_matches_seed(seed.to_params(start), state.params, seed.to_params(theirs))


@pytest.mark.parametrize("sampling", ["shuffle", "sample"])
def test_minibatch_steps_are_the_seed_sgd_minibatch_on_the_same_indices(tiny, sampling):
    job = config.load_job(None, ["optimizer.name=minibatch", "optimizer.lr=0.05", "optimizer.batch_size=4",
                                 f"optimizer.sampling={sampling}", "model.dtype=float64", "run.steps=7",
                                 "run.seed=5"])
    start = seed_start(job)
    indices = [trainer.make_sampler(job, 20).batch(s).tolist() for s in range(7)]
    state = trainer.train(job, tiny)
    theirs = seed.SGD_minibatch(*tiny_images(tiny), *seed.unpack(copy.deepcopy(start)), learning_rate=0.05,
                                minibatch_size=4, batches=7, batch_indices=indices)
    assert_matches_seed(seed.to_params(start), state.params, seed.to_params(theirs))


def test_gd_epochs_are_the_seed_gd(tiny):
    job = config.load_job(None, ["optimizer.name=gd", "model.dtype=float64", "run.epochs=3", "run.seed=8"])
    assert job.optimizer.learning_rate == 0.05  # the seed's GD rate by default
    start = seed_start(job)
    state = trainer.train(job, tiny)
    theirs = seed.GD(*tiny_images(tiny), *seed.unpack(copy.deepcopy(start)), learning_rate=0.05, epochs=3)
    assert_matches_seed(seed.to_params(start), state.params, seed.to_params(theirs))
    accuracy = seed.test_neural_network(seed.images_from_uint8(tiny.test_x), list(tiny.test_y),
                                        *seed.unpack(seed.from_params(state.params)))
    assert state.metrics["test_accuracy"] * 100 == pytest.approx(accuracy)


# ------------------------------------------------------------ the loop itself


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_is_a_hand_loop_of_sampler_mlp_and_optim_bit_for_bit(backend, momentum):
    job = config.load_job(None, ["optimizer.lr=0.1", "run.steps=30", "run.seed=2", f"optimizer.momentum={momentum}"])
    state = trainer.train(job, backend)
    hand = trainer.initial_state(job)
    params, opt_state = hand.params, hand.opt_state
    sampler = trainer.make_sampler(job, backend.n_train)
    for step in range(30):
        batch = sampler.batch(step)
        sums, _, count = mlp.loss_and_grad_sums(params, mlp.scale_pixels(backend.train_x[batch]),
                                                backend.train_y[batch])
        params, opt_state = optim.step(params, optim.mean_grads(sums, count), opt_state, 0.1, momentum)
    assert same(state.params, params)


def test_resuming_from_a_state_continues_the_same_run(backend):
    base = ["optimizer.lr=0.1", "optimizer.sampling=shuffle", "run.seed=4", "optimizer.momentum=0.5"]
    whole = run(backend, base + ["run.steps=300"])
    half = run(backend, base + ["run.steps=140"])
    resumed = run(backend, base + ["run.steps=300"], half)
    assert resumed.step == 300 and resumed.samples_seen == whole.samples_seen
    assert same(whole.params, resumed.params)


def test_epochs_set_the_number_of_steps(backend):
    job = config.load_job(None, ["optimizer.batch_size=1000", "run.epochs=2"])
    assert trainer.total_steps(job, trainer.make_sampler(job, 8000)) == 16
    job = config.load_job(None, ["optimizer.batch_size=1000", "run.epochs=2", "run.steps=5"])
    assert trainer.total_steps(job, trainer.make_sampler(job, 8000)) == 5


class Hooks(trainer.Hook):
    def __init__(self):
        self.calls = []

    def on_start(self, state, info):
        self.calls.append(("start", info))

    def on_step(self, state, record):
        self.calls.append(("step", dict(record)))

    def on_end(self, state, record):
        self.calls.append(("end", record))


def test_hooks_see_every_step_and_evaluations_on_schedule(backend):
    hooks = Hooks()
    job = config.load_job(None, ["optimizer.batch_size=100", "run.steps=6", "run.eval_every=4"])
    trainer.train(job, backend, hooks=[hooks])
    kinds = [c[0] for c in hooks.calls]
    assert kinds == ["start"] + ["step"] * 6 + ["end"]
    assert hooks.calls[0][1] == {"steps": 6, "steps_per_epoch": 80, "workers": 0, "n_train": 8000, "n_test": 2000}
    steps = [c[1] for c in hooks.calls[1:7]]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [("test_accuracy" in r) for r in steps] == [False, False, False, True, False, True]
    assert all(r["samples_seen"] == 100 * r["step"] and np.isfinite(r["train_loss"]) for r in steps)


class PoisonedBackend(trainer.LocalBackend):
    """LocalBackend whose gradient sums turn to NaN at the given (0-based) steps."""

    def __init__(self, inner, bad_steps):
        vars(self).update(vars(inner))
        self.bad_steps = set(bad_steps)

    def grad_sums(self, params, batch, step):
        grads, loss_sum, count = super().grad_sums(params, batch, step)
        if step in self.bad_steps:
            grads["W2"][0, 0] = np.nan
        return grads, loss_sum, count


def test_a_nonfinite_gradient_stops_the_run_naming_the_step(backend):
    job = config.load_job(None, ["run.steps=5"])
    with pytest.raises(trainer.DivergenceError, match="at step 3$"):
        trainer.train(job, PoisonedBackend(backend, {2}))


def test_skip_policy_skips_up_to_two_updates_in_a_row(backend):
    job = config.load_job(None, ["run.steps=6", "run.on_nonfinite=skip"])
    skipped = trainer.train(job, PoisonedBackend(backend, {1, 2}))
    assert skipped.step == 6 and all(np.isfinite(p).all() for p in skipped.params.values())
    with pytest.raises(trainer.DivergenceError, match="at step 4"):
        trainer.train(job, PoisonedBackend(backend, {1, 2, 3}))


def test_round_steps_are_the_records_one_step_at_a_time():
    """The loop hands a round's records to the hooks as columns (trainer.Steps); their records
    are what counting one step at a time in Python gives, bit for bit."""
    job = config.load_job(None, ["optimizer.lr=0.05", "run.steps=40", "run.eval_every=6"])
    plan = trainer.Plan(trainer.make_sampler(job, 8000), 0.05, 0.0, 6, 40)
    state = trainer.TrainState(params={}, opt_state={}, step=10, samples_seen=320)
    rng = np.random.default_rng(3)
    records = [trainer.StepRecord(float(rng.random() * 70), 32, float(rng.random() * 1e-4),
                                  float(rng.random() * 2e-4)) for _ in range(30)]
    evals = {12: (900, 300.5, 1000), 18: (901, 299.0, 1000), 24: (905, 250.0, 1000), 30: (910, 200.0, 1000),
             36: (911, 199.0, 1000), 40: (920, 180.0, 1000)}
    steps = trainer.round_steps(job, plan, state, records, evals)
    expected, seen = [], state.samples_seen
    for i, rec in enumerate(records):
        step = state.step + i + 1
        seen += rec.count
        record = {"step": step, "epoch": step / plan.sampler.steps_per_epoch, "samples_seen": seen,
                  "train_loss": rec.loss_sum / rec.count, "lr": 0.05, "step_s": rec.step_s,
                  "compute_s": rec.compute_s, "comm_s": max(rec.step_s - rec.compute_s, 0.0)}
        if step in evals:
            correct, loss_sum, n = evals[step]
            record.update(test_loss=loss_sum / n, test_accuracy=correct / n)
        expected.append(record)
    assert steps.records() == expected
    assert [type(v) for v in steps.records()[0].values()] == [type(v) for v in expected[0].values()]
    assert trainer.round_steps(job, plan, state, records, evals).record(-1) == expected[-1]
    assert trainer.round_steps(job, plan, state, records, evals).record(1) == expected[1]
    with pytest.raises(RuntimeError, match="did not evaluate the weights after step 36"):
        trainer.round_steps(job, plan, state, records, {k: v for k, v in evals.items() if k != 36})


def test_per_step_hooks_see_the_state_at_their_step(backend):
    """A hook with on_step only (Hook.on_steps' default) sees state.step and samples_seen at each
    record, and the loop's state at the round's end afterwards."""
    seen = []

    class Per(trainer.Hook):
        def on_step(self, state, record):
            seen.append((state.step, state.samples_seen, state.metrics is record, record["step"]))

    job = config.load_job(None, ["optimizer.batch_size=100", "run.steps=6", "run.eval_every=4"])
    state = trainer.train(job, backend, hooks=[Per()])
    assert seen == [(s, 100 * s, True, s) for s in range(1, 7)]
    assert (state.step, state.samples_seen, state.metrics["step"]) == (6, 600, 6)
