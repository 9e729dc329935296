"""The Ray engine equals the single-process trainer.

Tolerance: the engine adds per-worker partial sums in a different order than one matmul over
the whole batch, so float32 results differ by rounding only: a few ulp per step, growing
slowly over steps. (Even 1 worker is not bit-identical to the in-process trainer:
the worker runs BLAS on one thread, the test process on several, which changes the order of
the sums inside a matmul.) After a handful of steps |diff| <= 1e-5 absolute + 1e-4 relative is far
below any real change (one update moves weights by ~lr * grad ~ 1e-3) and far above rounding.
"""

import numpy as np
import pytest

from distmlp import config, data, step, trainer, transport

RTOL, ATOL = 1e-4, 1e-5


def job_for(optimizer, workers, **run):
    overrides = [f"optimizer.name={optimizer!r}".replace("'", '"'), f"cluster.workers={workers}",
                 "cluster.cpus_per_worker=0.5", "run.seed=3"]
    if optimizer == "minibatch":
        overrides.append("optimizer.lr=0.1")
    job = config.load_job(None, overrides)
    return config.replace(job, run=run)


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


@pytest.fixture(scope="module")
def local(source):
    return trainer.LocalBackend(source)


def run_ray(job, source):
    backend = transport.start(source, job)
    try:
        return trainer.train(job, backend), backend
    finally:
        backend.close()


CASES = [("gd", {"steps": 3}), ("minibatch", {"steps": 25}), ("sgd", {"steps": 40})]


@pytest.mark.parametrize("optimizer,run", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_ray_equals_single_process(ray_session, source, local, optimizer, run, workers):
    job = job_for(optimizer, workers, **run)
    expected = trainer.train(job, local)
    got, _ = run_ray(job, source)
    assert got.step == expected.step
    for name in expected.params:
        np.testing.assert_allclose(got.params[name], expected.params[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert got.metrics["test_accuracy"] == pytest.approx(expected.metrics["test_accuracy"], abs=1e-3)


@pytest.mark.parametrize("optimizer", ["gd", "minibatch"])
def test_repeated_runs_bit_identical(ray_session, source, optimizer):
    job = job_for(optimizer, 3, steps=5)
    first, _ = run_ray(job, source)
    second, _ = run_ray(job, source)
    for name in first.params:
        assert np.array_equal(first.params[name], second.params[name]), name


def test_minibatch_indices_go_to_their_owner(ray_session, source):
    job = job_for("minibatch", 3, steps=1)
    backend = transport.start(source, job)
    try:
        batch = np.array([0, 2666, 2667, 5333, 5334, 7999, 4000])
        shares = step.shares(batch, backend.group.bounds)
        assert {r: list(v) for r, v in shares.items()} == {0: [0, 2666], 1: [0, 2666, 1333], 2: [0, 2665]}
        infos = backend.group.worker_info
        assert [i["n_train"] for i in infos] == [2667, 2667, 2666]
        assert [i["n_test"] for i in infos] == [667, 667, 666]
    finally:
        backend.close()


def test_workers_read_parquet_shards_and_match_idx(ray_session, source, tmp_path):
    """Same rows from Parquet shards (3 files, by file:// URI) as from IDX: bit-identical training."""
    from distmlp.data import parquet as shards
    shards.convert(source, tmp_path / "shards", 3)
    parquet = data.resolve(path=(tmp_path / "shards").as_uri())
    assert parquet.train.kind == "parquet" and parquet.train.count == source.train.count
    job = job_for("gd", 2, steps=2)
    from_idx, _ = run_ray(job, source)
    from_parquet, _ = run_ray(job, parquet)
    for name in from_idx.params:
        assert np.array_equal(from_idx.params[name], from_parquet.params[name]), name
    assert from_idx.metrics["test_accuracy"] == from_parquet.metrics["test_accuracy"]


@pytest.mark.parametrize("n,chunk", [(400, 1024), (400, 128), (399, 100), (1, 7)])
def test_chunked_full_batch_sums_equal_one_pass_within_rounding(source, n, chunk):
    """A worker's full-shard sums, chunk rows at a time, equal one pass within rounding (bitwise in one chunk)."""
    from distmlp import kernels, mlp
    x8, y = data.load_rows(source.train, 0, n)
    params = mlp.init_params((784, 16, 16, 10), np.random.default_rng(6), np.float64)
    expected, loss, count = mlp.loss_and_grad_sums(params, mlp.scale_pixels(x8, np.float64), y)
    got, got_loss, got_count = kernels.chunked_grad_sums(params, x8, y, np.float64, chunk)
    assert got_count == count == n and got_loss == pytest.approx(loss, rel=1e-12)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12, err_msg=name)
        if n <= chunk:
            assert got[name].tobytes() == expected[name].tobytes(), name


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_chunks_scaled_into_one_buffer_are_the_same_bits(source, dtype):
    """The kernel scales each chunk into one reused buffer (mlp.scale_pixels(out=)): the same bits as
    new arrays, every pixel value and a last chunk shorter than the buffer."""
    from distmlp import kernels, mlp, step
    pixels = np.arange(256, dtype=np.uint8)
    assert mlp.scale_pixels(pixels, dtype, np.empty(256, dtype)).tobytes() == mlp.scale_pixels(pixels, dtype).tobytes()
    assert mlp.scale_pixels(pixels, dtype).tobytes() == (pixels.astype(dtype) / dtype(255)).tobytes()
    x8, y = data.load_rows(source.train, 0, 333)
    params = mlp.init_params((784, 16, 16, 10), np.random.default_rng(7), dtype)
    fresh, fresh_loss, _ = kernels.chunked_grad_sums(params, x8, y, dtype, 100)
    buffer = np.full((100, 784), np.nan, dtype)
    reused, reused_loss, _ = kernels.chunked_grad_sums(params, x8, y, dtype, 100, buffer)
    assert reused_loss == fresh_loss
    for name in fresh:
        assert reused[name].tobytes() == fresh[name].tobytes(), name
    kernel = kernels.make("numpy", dtype, chunk_rows=100)
    out = np.empty(sum(p.size for p in params.values()), dtype)
    for _ in range(2):  # the second call reuses the buffer the first made
        assert kernel.grad_sums(params, x8, y, None, out) == (fresh_loss, 333)
        assert out.tobytes() == step.flatten(fresh, mlp.param_names(3)).tobytes()
