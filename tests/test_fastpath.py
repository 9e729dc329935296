"""The fast transport (weight replicas + exact gradient factors) equals the actor transport bit for bit.

Pure parts are checked against mlp.loss_and_grad_sums (itself checked against finite
differences and the seed transcription); replicas are driven in-process exactly as the
compiled graph drives them; the Ray tests compare whole runs of both transports.
"""

import logging
import re

import numpy as np
import pytest

from distmlp import config, data, driver, fastpath, mlp, optim, trainer
from hooks import AtStep, kill
from distmlp.config import ConfigError

SIZES = (784, 16, 16, 10)


@pytest.fixture(scope="module")
def rows():
    x, y = data.load_rows(data.bundled_sample().train, 0, 400)
    tx, ty = data.load_rows(data.bundled_sample().test, 0, 100)
    return x, y, tx, ty


def params_for(seed, dtype=np.float32):
    return mlp.init_params(SIZES, np.random.default_rng(seed), dtype)


def bits_equal(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# ------------------------------------------------------------------------------ pure parts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, 16, 32])
def test_factors_rebuild_the_gradient_sums_bit_for_bit(rows, dtype, n):
    x8, y, _, _ = rows
    params = params_for(n, dtype)
    x = mlp.scale_pixels(x8[:n], dtype)
    expected, loss, count = mlp.loss_and_grad_sums(params, x, y[:n])
    deltas, hidden, loss_sum = fastpath.factors(params, x, y[:n])
    blob = fastpath.encode_factors(deltas, hidden, dtype)
    assert len(blob) == n * (sum(SIZES[1:]) + sum(SIZES[1:-1])) * np.dtype(dtype).itemsize
    got = fastpath.grads_from_factors(*fastpath.decode_factors(blob, n, SIZES, dtype), x)
    assert bits_equal(got, expected) and loss_sum == loss


def test_per_worker_grads_add_in_rank_order_like_the_driver(rows):
    x8, y, _, _ = rows
    params, starts, batch = params_for(1), np.array([0, 150, 300]), np.array([5, 320, 151, 7, 299, 1])
    owner = fastpath.owners(batch, starts)
    assert owner.tolist() == [0, 2, 1, 0, 1, 0]
    payloads, expected = [], None
    for rank in range(3):
        mine = batch[owner == rank]
        x = mlp.scale_pixels(x8[mine])
        deltas, hidden, _ = fastpath.factors(params, x, y[mine])
        payloads.append(fastpath.encode_factors(deltas, hidden, np.float32))
        part = mlp.loss_and_grad_sums(params, x, y[mine])[0]
        expected = {k: g.copy() for k, g in part.items()} if expected is None else optim.add_into(expected, part)
    parts = fastpath.per_worker_grads(batch, payloads, starts, x8, SIZES, np.float32)
    assert sorted(parts) == [0, 1, 2]
    assert bits_equal(fastpath.total_grads(parts), expected)


def test_fingerprint_sees_one_ulp_anywhere():
    params = params_for(0)
    fp = fastpath.fingerprint(params)
    assert fastpath.fingerprint({k: v.copy() for k, v in params.items()}) == fp
    for name in params:
        changed = {k: v.copy() for k, v in params.items()}
        flat = changed[name].reshape(-1)
        flat[-1] = np.nextafter(flat[-1], np.float32(np.inf))
        assert fastpath.fingerprint(changed) != fp, name
    assert fastpath.fingerprint(params_for(0, np.float64)) != fp


def test_request_round_trip_with_weights_and_pending_factors():
    params, batch = params_for(2), np.array([3, 9, 4], np.int64)
    blob = fastpath.encode_request(fastpath.OP_STEP, 7, 123, batch)
    op, step, fp, got_batch, sync, pending = fastpath.decode_request(blob, np.float32)
    assert (op, step, fp, got_batch.tolist(), sync, pending) == (fastpath.OP_STEP, 7, 123, [3, 9, 4], None, None)
    bounds, prev = [(0, 50), (50, 100)], np.array([1, 250, 2])
    blob = fastpath.encode_request(fastpath.OP_EVAL, 0, 2**64 - 1, None, (params, 0.25, SIZES, [0, 200], bounds),
                                   (6, prev, [b"ab", b"", b"cde"]))
    op, step, fp, got_batch, sync, pending = fastpath.decode_request(blob, np.float32)
    got, lr, sizes, starts, test_bounds = sync
    assert (op, fp, len(got_batch), lr, sizes, starts.tolist()) == (fastpath.OP_EVAL, 2**64 - 1, 0, 0.25, SIZES, [0, 200])
    assert test_bounds.tolist() == [[0, 50], [50, 100]] and bits_equal(got, params)
    assert (pending[0], pending[1].tolist(), bytes(pending[2])) == (6, [1, 250, 2], b"abcde")


# ------------------------------------------------------------------ replicas, in-process


class Driver:
    """Drives Replica objects the way FastTransport drives the workers, without Ray."""

    def __init__(self, node_data, workers, lr=0.1):
        self.x = node_data[0]
        self.starts = np.array([lo for lo, _ in data.shard_bounds(len(self.x), workers)])
        self.bounds = data.shard_bounds(len(node_data[3]), workers)
        self.replicas = [fastpath.Replica(r, node_data, np.float32) for r in range(workers)]
        self.lr = lr

    def request(self, op, step, params, batch, sync=False, pending=None):
        extra = (params, self.lr, SIZES, self.starts, self.bounds) if sync else None
        return fastpath.encode_request(op, step, fastpath.fingerprint(params), batch, extra, pending)

    def round(self, *args, **kwargs):
        blob = self.request(*args, **kwargs)
        return [r.handle(blob) for r in self.replicas]

    def grads(self, replies, batch):
        payloads = [fastpath.reply_payload(r) for r in replies]
        return fastpath.total_grads(fastpath.per_worker_grads(batch, payloads, self.starts, self.x, SIZES, np.float32))


def test_replicas_follow_the_loop_update_and_stale_ones_ask_for_weights(rows):
    d = Driver(rows, 2)
    params = params_for(3)
    replies = d.round(fastpath.OP_STEP, 0, params, np.arange(8))
    assert [fastpath.reply_status(r) for r in replies] == [fastpath.SYNC] * 2
    rng = np.random.default_rng(0)
    pending = None
    for step in range(6):
        batch = rng.choice(400, 32, replace=False)
        replies = d.round(fastpath.OP_STEP, step, params, batch, sync=step == 0, pending=pending)
        assert not any(map(fastpath.reply_status, replies))
        params, _ = optim.step(params, optim.mean_grads(d.grads(replies, batch), 32), {}, d.lr)
        pending = (step, batch, [fastpath.reply_payload(r) for r in replies])
    # the pending update brings every replica to the loop's weights, bit for bit
    blob = d.request(fastpath.OP_EVAL, 0, params, None, pending=pending)
    assert not any(fastpath.reply_status(r.handle(blob)) for r in d.replicas)
    assert all(bits_equal(r.params, params) for r in d.replicas)
    # the same request again (an actor call repeated after a failure) does not apply it twice
    assert not any(fastpath.reply_status(r.handle(blob)) for r in d.replicas)
    # weights the replicas did not compute (another update rule, a resume): SYNC, then in step
    other = params_for(4)
    assert all(fastpath.reply_status(r) == fastpath.SYNC for r in d.round(fastpath.OP_EVAL, 0, other, None))
    replies = d.round(fastpath.OP_EVAL, 0, other, None, sync=True)
    _, _, tx, ty = rows
    expected = mlp.evaluate_sums(other, mlp.scale_pixels(tx[:50]), ty[:50])
    assert fastpath._REPLY.unpack_from(replies[0])[1:3] == expected[:2]


def test_compiled_only_for_replica_friendly_jobs():
    for bad in (['optimizer.name="gd"'], ["optimizer.momentum=0.9"]):
        assert not fastpath.eligible(config.load_job(None, bad))
        with pytest.raises(ConfigError, match="cluster.transport"):
            config.load_job(None, [*bad, 'cluster.transport="compiled"'])
    for good in (['optimizer.name="sgd"'], ['optimizer.name="minibatch"']):
        assert fastpath.eligible(config.load_job(None, [*good, 'cluster.transport="compiled"']))


# ----------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


def job_for(optimizer, transport, steps, workers=2):
    return config.load_job(None, [f'optimizer.name="{optimizer}"', "optimizer.lr=0.1", "run.seed=11",
                                  f"run.steps={steps}", "run.eval_every=7", f"cluster.workers={workers}",
                                  "cluster.cpus_per_worker=0.5", f'cluster.transport="{transport}"'])


def run(job, source, hooks=()):
    backend = driver.RayBackend(source, job)
    try:
        used_fast = backend.fast is not None
        return trainer.train(job, backend, hooks=[h(backend) for h in hooks]), used_fast, backend
    finally:
        backend.close()


@pytest.mark.parametrize("optimizer,steps,workers", [("minibatch", 15, 2), ("sgd", 20, 2), ("minibatch", 8, 3)])
def test_compiled_transport_equals_actor_calls_bit_for_bit(ray_session, source, optimizer, steps, workers):
    fast, used_fast, _ = run(job_for(optimizer, "compiled", steps, workers), source)
    slow, used_slow, _ = run(job_for(optimizer, "actors", steps, workers), source)
    assert used_fast and not used_slow
    assert fast.step == slow.step == steps
    assert bits_equal(fast.params, slow.params)
    assert fast.metrics["test_loss"] == slow.metrics["test_loss"]
    assert fast.metrics["test_accuracy"] == slow.metrics["test_accuracy"]
    assert fast.metrics["train_loss"] == slow.metrics["train_loss"]
    assert 0 < fast.metrics["compute_s"] <= fast.metrics["step_s"]


def test_direct_calls_with_unrelated_weights_resync_and_stay_exact(ray_session, source):
    """grad_sums with weights the replicas never computed: they are sent, the result is exact."""
    job = job_for("minibatch", "compiled", 1)
    fast = driver.RayBackend(source, job)
    slow = driver.RayBackend(source, config.replace(job, cluster={"transport": "actors"}))
    try:
        batch = np.array([3, 5000, 17, 7999, 4000, 0])
        for seed in (1, 2, 2):
            params = params_for(seed)
            a, b = fast.grad_sums(params, batch, seed), slow.grad_sums(params, batch, seed)
            assert bits_equal(a.grads, b.grads) and a.loss_sum == b.loss_sum and a.count == b.count == 6
            assert fast.evaluate(params) == slow.evaluate(params)
    finally:
        fast.close()
        slow.close()


def test_a_killed_worker_tears_the_graph_down_recovers_and_rebuilds(ray_session, source, caplog):
    """transport compiled: the graph; the reference is the same job over actor calls."""
    job = job_for("minibatch", "compiled", 10)
    reference, _, _ = run(config.replace(job, cluster={"transport": "actors"}), source)
    with caplog.at_level(logging.WARNING, logger="distmlp"):
        state, used_fast, backend = run(job, source, [AtStep(4, kill(1))])
    messages = [r.getMessage() for r in caplog.records]
    assert any("compiled graph failed" in m for m in messages), messages
    assert any("worker 1" in m and "restarting" in m for m in messages), messages
    assert used_fast and backend.failures == 1 and backend.fast.graph_failures == 1
    assert bits_equal(state.params, reference.params)


@pytest.mark.parametrize("n,chunk", [(400, 1024), (400, 128), (399, 100), (1, 7)])
def test_chunked_full_batch_sums_equal_one_pass_within_rounding(rows, n, chunk):
    x8, y, _, _ = rows
    params = params_for(6, np.float64)
    expected, loss, count = mlp.loss_and_grad_sums(params, mlp.scale_pixels(x8[:n], np.float64), y[:n])
    got, got_loss, got_count = fastpath.chunked_grad_sums(params, x8[:n], y[:n], np.float64, chunk)
    assert got_count == count == n and got_loss == pytest.approx(loss, rel=1e-12)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-10, atol=1e-12, err_msg=name)
    if n <= chunk:
        assert bits_equal(got, expected)


def test_nonfinite_steps_are_skipped_and_reported_as_over_actor_calls(ray_session, source):
    """lr 1e6 with on_nonfinite = "skip": the same steps skipped, the same step and worker named."""
    outcomes = []
    for transport in ("compiled", "actors"):
        job = config.replace(job_for("minibatch", transport, 12), optimizer={"lr": 1e6},
                             run={"on_nonfinite": "skip"})
        with pytest.raises(trainer.DivergenceError) as info:
            run(job, source)
        outcomes.append(re.sub(r"pid \d+", "pid _", str(info.value)))
    assert outcomes[0] == outcomes[1] and "in worker" in outcomes[0]
