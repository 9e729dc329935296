"""The gradient-sum kernels (model.kernel): numba against the NumPy reference and finite
differences, the same bits in every transport with numba, and a clear error without numba.

Tolerance of numba against NumPy: every entry within 1e-5 (float32) or 1e-12 (float64) of the
largest reference entry of its array; the loss within the same relative bound. The compiled
loop adds in another order than BLAS (and may fuse multiply-adds), so bits differ by rounding.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from distmlp import config, data, driver, kernels, mlp, optim, step, trainer, transport

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None, reason="numba not installed (extra 'fast')")
TOLERANCE = {np.float32: 1e-5, np.float64: 1e-12}
LAYERS = [(784, 16, 16, 10), (784, 10), (784, 32, 24, 16, 10), (13, 7, 3)]


def problem(sizes, dtype, seed, n=300):
    """Random weights (nonzero biases), uint8 rows and labels for a model of sizes."""
    rng = np.random.default_rng(seed)
    params = mlp.init_params(sizes, rng, dtype)
    params = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}
    x = rng.integers(0, 256, (n, sizes[0]), dtype=np.uint8)
    y = rng.integers(0, sizes[-1], n).astype(np.uint8)
    return params, x, y, rng


def sums(name, params, x, y, rows, dtype):
    """(flat gradient sums, loss sum, count) of kernel `name`."""
    out = np.full(sum(p.size for p in params.values()), np.nan, dtype)
    loss_sum, count = kernels.make(name, dtype).grad_sums(params, x, y, rows, out)
    return out, loss_sum, count


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", LAYERS, ids=["-".join(map(str, s)) for s in LAYERS])
def test_numba_equals_numpy_within_rounding(sizes, dtype):
    params, x, y, rng = problem(sizes, dtype, len(sizes))
    for batch in (1, 7, 32, 100):
        rows = rng.integers(0, len(y), batch)  # repeats allowed, as a sampler never draws but a kernel must take
        want, want_loss, want_count = sums("numpy", params, x, y, rows, dtype)
        got, got_loss, got_count = sums("numba", params, x, y, rows, dtype)
        assert got_count == want_count == batch
        assert got_loss == pytest.approx(want_loss, rel=TOLERANCE[dtype])
        for name, g in step.unflatten(got, params).items():
            ref = step.unflatten(want, params)[name]
            np.testing.assert_allclose(g, ref, rtol=0, atol=TOLERANCE[dtype] * np.abs(ref).max(), err_msg=name)


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sizes", LAYERS, ids=["-".join(map(str, s)) for s in LAYERS])
def test_numba_evaluates_the_held_out_rows_as_numpy_does(sizes, dtype):
    """The compiled evaluation (uint8 rows, the training forward pass) against mlp.evaluate_sums
    on the scaled rows: the same count correct, the loss within rounding, for every number of
    rows around its blocks of 64; no rows gives nothing."""
    params, x, y, _ = problem(sizes, dtype, 11, n=200)
    for n in (0, 1, 63, 64, 65, 200):
        want = kernels.make("numpy", dtype).held_out(x[:n], y[:n]).evaluate(params)
        got = kernels.make("numba", dtype).held_out(x[:n], y[:n]).evaluate(params)
        assert got[0] == want[0] and got[2] == want[2] == n and type(got[0]) is int
        assert got[1] == pytest.approx(want[1], rel=TOLERANCE[dtype], abs=0 if n else 1e-12)
    assert isinstance(kernels.make("numpy", dtype).held_out(x, y), mlp.HeldOut)


@needs_numba
def test_numba_evaluation_counts_as_numpys_argmax_with_ties_and_nans():
    """Ties go to the first largest logit and a NaN counts as the largest, as np.argmax has it;
    non-finite weights give a non-finite loss."""
    sizes = (4, 3)
    x = np.array([[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0]], np.uint8)
    y = np.array([0, 1, 2], np.uint8)
    params = {"W1": np.zeros((3, 4), np.float32), "b1": np.zeros(3, np.float32)}  # all tie: class 0
    params["W1"][1, 0] = params["W1"][2, 1] = np.nan  # 0 * NaN is NaN: every row's logits 1 and 2 are NaN
    for name in ("numpy", "numba"):
        correct, loss_sum, n = kernels.make(name, np.float32).held_out(x, y).evaluate(params)
        assert n == 3 and np.isnan(loss_sum), name
        logits = mlp.forward(params, mlp.scale_pixels(x))[0]
        assert correct == int(np.sum(logits.argmax(axis=1) == y)), name
    params["W1"][:] = 0
    assert kernels.make("numba", np.float32).held_out(x, y).evaluate(params)[0] == 1  # ties: class 0 only


@needs_numba
@pytest.mark.parametrize("sizes", [(13, 7, 3), (9, 8, 7, 6, 5), (12, 4)])
def test_numba_gradients_match_central_differences(sizes):
    params, x, y, rng = problem(sizes, np.float64, 7, n=20)
    rows = rng.permutation(20)[:9]
    grads, _, _ = sums("numba", params, x, y, rows, np.float64)
    names = mlp.param_names(len(sizes) - 1)
    flat = step.flatten(params, names)
    eps = 1e-6
    fd = np.empty_like(flat)
    for i in range(flat.size):
        loss = []
        for sign in (1, -1):
            moved = flat.copy()
            moved[i] += sign * eps
            loss.append(sums("numba", step.unflatten(moved, params), x, y, rows, np.float64)[1])
        fd[i] = (loss[0] - loss[1]) / (2 * eps)
    np.testing.assert_allclose(grads, fd, rtol=1e-5, atol=1e-6 * np.abs(fd).max())


@needs_numba
def test_a_full_batch_goes_through_the_numpy_path_in_both_kernels():
    params, x, y, _ = problem((784, 16, 16, 10), np.float32, 3, n=2500)
    want, want_loss, _ = sums("numpy", params, x, y, None, np.float32)
    got, got_loss, count = sums("numba", params, x, y, None, np.float32)
    assert count == 2500 and got_loss == want_loss and got.tobytes() == want.tobytes()


@needs_numba
def test_non_finite_weights_give_a_non_finite_loss_and_gradient():
    """fastmath without the finite-values assumption: the divergence check still sees a NaN."""
    params, x, y, _ = problem((784, 16, 16, 10), np.float32, 4)
    params["W2"][3, 5] = np.nan
    got, loss, _ = sums("numba", params, x, y, np.arange(32), np.float32)
    assert not np.isfinite(loss) and not step.all_finite(got)


def test_without_numba_the_job_stops_with_one_line_before_ray_starts(tmp_path):
    script = ("import sys; sys.modules['numba'] = None\n"
              "import ray\nfrom distmlp.cli import app\n"
              "try:\n    app(['train', '--workers', '2', '--steps', '2', '--set', 'model.kernel=\"numba\"'])\n"
              "finally:\n    print('ray started:', ray.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": os.path.dirname(os.path.dirname(kernels.__file__))})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.kernel" in lines[0] and "pip install -e '.[fast]'" in lines[0], proc.stderr
    assert proc.stdout.strip().endswith("ray started: False")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


def job_for(name, steps, workers, transport_name="auto", **model):
    job = config.load_job(None, [f'optimizer.name="{name}"', "optimizer.lr=0.1", "run.seed=5", f"run.steps={steps}",
                                 "run.eval_every=6", f"cluster.workers={workers}", "cluster.cpus_per_worker=0.5",
                                 f'cluster.transport="{transport_name}"', 'model.kernel="numba"'])
    return config.replace(job, model=model) if model else job


class Losses(trainer.Hook):
    def __init__(self):
        self.losses = []

    def on_step(self, state, record):
        self.losses.append((record["train_loss"], record.get("test_loss")))


def train(job, source):
    """(final state, [(train loss, test loss)]) of job: in this process for workers 0, else on Ray."""
    losses = Losses()
    if job.cluster.workers == 0:
        backend = driver.OneThread(trainer.LocalBackend(source, job.model.dtype, job.model.kernel))  # as the CLI runs it
    else:
        backend = transport.start(source, job)
    try:
        return trainer.train(job, backend, hooks=[losses]), losses.losses, type(backend).__name__
    finally:
        backend.close()


def same_bits(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


@needs_numba
@pytest.mark.parametrize("name, steps, dtype", [("minibatch", 20, "float32"), ("sgd", 20, "float32"),
                                                ("minibatch", 12, "float64")])
def test_numba_gives_the_same_bits_in_every_transport(ray_session, source, name, steps, dtype):
    """One worker: the single process, the mesh and actor calls compute the same sums in one call;
    two workers: the mesh and actor calls add the same two parts."""
    one = job_for(name, steps, 0, dtype=dtype, kernel="numba")
    want, want_losses, _ = train(one, source)
    runs = {(workers, how): train(config.replace(one, cluster={"workers": workers, "transport": how}), source)
            for workers in (1, 2) for how in ("mesh", "actors")}
    assert {how: runs[2, how][2] for how in ("mesh", "actors")} == {"mesh": "MeshTransport", "actors": "ActorTransport"}
    for how in ("mesh", "actors"):
        got, losses, _ = runs[1, how]
        assert same_bits(got.params, want.params) and losses == want_losses, how
    (mesh, mesh_losses, _), (actors, actor_losses, _) = runs[2, "mesh"], runs[2, "actors"]
    assert same_bits(mesh.params, actors.params) and mesh_losses == actor_losses


@needs_numba
def test_each_step_prefetches_the_next_steps_rows_and_changes_nothing(source):
    """The single-process backend asks the numba kernel to start loading step s+1's rows during
    step s, and its weights equal those of a run that prefetches nothing; prefetch_rows takes
    read-only rows and either index type and leaves the rows as they were."""
    job = job_for("minibatch", 6, 0)
    backend = trainer.LocalBackend(source, job.model.dtype, "numba")
    asked, prefetch = [], backend.kernel.prefetch
    backend.kernel.prefetch = lambda x, rows: (asked.append(rows.tolist()), prefetch(x, rows))
    got = trainer.train(job, backend)
    sampler = trainer.make_sampler(job, backend.n_train)
    assert asked == [sampler.batch(at + 1).tolist() for at in range(6)]
    without = trainer.LocalBackend(source, job.model.dtype, "numba")
    without.kernel.prefetch = None
    assert same_bits(trainer.train(job, without).params, got.params)
    rows = np.arange(5 * 300, dtype=np.uint8).reshape(5, 300)
    rows.flags.writeable = False
    for index in (np.int32, np.int64):
        prefetch(rows, np.array([4, 0, 4], index))
    assert rows.tobytes() == np.arange(5 * 300, dtype=np.uint8).tobytes()
    assert kernels.make("numpy", "float32").prefetch is None  # the reference: no compiled code


@needs_numba
def test_an_epoch_with_numba_reaches_the_held_out_accuracy_of_numpy(source):
    """The quickstart's model, lr and batch for one epoch of the bundled sample, in this process."""
    job = config.load_job(os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.toml"),
                          ["run.epochs=1", "cluster.workers=0"])
    accuracy = {}
    for kernel in ("numpy", "numba"):
        backend = trainer.LocalBackend(source, job.model.dtype, kernel)
        accuracy[kernel] = trainer.train(job, backend).metrics["test_accuracy"]
    assert accuracy["numpy"] > 0.8 and abs(accuracy["numba"] - accuracy["numpy"]) <= 0.01, accuracy


@needs_numba
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_update_gives_numpys_bits_and_refuses_the_same_steps(dtype, momentum):
    """step.apply_step of one part with the numba kernel's update against NumPy's: the same
    weights and velocity bit for bit over 50 steps of random sums (scales from 1e-3 to half the
    largest float, so some overflow), the same steps refused, a refused step changes nothing,
    and the part (which the compiled update reads without copying it) is left as it was."""
    rng = np.random.default_rng(int(momentum * 10) + (dtype == np.float64))
    params = mlp.init_params((30, 7, 4), rng, dtype)
    state = optim.init_state(params, momentum)
    numpy_weights = step.FlatWeights(params, state, momentum)
    numba_weights = step.FlatWeights(params, state, momentum, kernels.make("numba", dtype).update)
    refused = 0
    for _ in range(50):
        scale = rng.choice([1e-3, 1.0, 1e3, float(np.finfo(dtype).max) / 2])
        with np.errstate(over="ignore"):
            total = (rng.standard_normal(numpy_weights.total.size) * scale).astype(dtype)
        count, lr = int(rng.choice([1, 32, 60000])), float(rng.choice([4.0, 0.1, 0.05, 0.0123456789]))
        before = numba_weights.state()
        applied = []
        for weights in (numpy_weights, numba_weights):
            part = total.copy()
            with np.errstate(over="ignore", invalid="ignore"):  # a refused step's cause sums the part
                applied.append(step.apply_step(weights, [(0, part, 1.0, count)], lr)[2] is None)
            assert part.tobytes() == total.tobytes()  # the compiled update reads one part in place
        assert applied[0] == applied[1]
        refused += not applied[0]
        for a, b in zip(numpy_weights.state(), numba_weights.state()):
            assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
        if not applied[1]:
            assert all(numba_weights.state()[0][k].tobytes() == before[0][k].tobytes() for k in before[0])
    assert 0 < refused < 50
