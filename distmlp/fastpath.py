"""The fast step transport: weight replicas in the workers, exact gradient factors on the wire.

A minibatch step over the plain actor path ships 52 KB of weights to every worker and 52 KB of
gradient sums back. Here every worker keeps a replica of the weights instead, and per step
returns only EXACT factors of its gradient sums: the per-layer deltas of its examples and their
hidden activations (layer i's weight gradient is delta_i^T @ a_(i-1), its bias gradient the
column sums of delta_i; a_0 is the pixel rows, which every worker and the driver read from the
node's one copy of the data set). The driver gathers the factors (~300 B per example), rebuilds
the gradient sums for the training loop and forwards the factors with the next step, where each
worker rebuilds the same sums and applies the same update to its replica. All messages are raw
bytes through one Ray compiled graph (ray.dag): one round trip per step.

Exactness: the gradient sums are rebuilt per worker, in rank order, with the same matmuls the
worker would run (single BLAS thread), so they equal the actor path's bit for bit. Every message
carries a fingerprint of the weights the driver holds; a worker whose replica differs answers
"sync" and the step is sent again with the full weights. On any failure the graph is torn down,
the same request goes over plain actor calls (which restart workers and count failures) and the
graph is rebuilt for the next step.

(A two-stage graph that sends every worker's factors straight to the other workers, so replicas
update while the driver works, measured twice the round-trip time of this one-stage graph.)
"""

import functools
import logging
import struct
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from threadpoolctl import ThreadpoolController

from distmlp import mlp, optim

log = logging.getLogger("distmlp")

OP_STEP, OP_EVAL = 0, 1
OK, SYNC = 0, 1
CHUNK_ROWS = 1024  # full-batch rows per chunk: (1024, 784) float32 is 3.2 MB
MAX_GRAPH_FAILURES = 10  # graph rebuilds per run; after that every step goes over actor calls
# op, step, weights fingerprint, batch rows, workers (0: no weights in the request),
# previous step (-1: no pending update), its batch rows
_REQUEST = struct.Struct("<qqQqqqq")
_REPLY = struct.Struct("<qqdd")  # status, rows (eval: correct), loss sum, compute seconds


# ----------------------------------------------------------------- data once per node


@ray.remote(num_cpus=0)
def _load_split_pair(source):
    from distmlp import data
    return data.load_rows(source.train) + data.load_rows(source.test)  # (train x, y, test x, y)


def put_per_node(source, node_ids):
    """{node id: ref to (train x, train y, test x, test y)}: each split loaded once on each node."""
    return {node: _load_split_pair.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(source)
        for node in sorted(set(node_ids))}


# ------------------------------------------------------------------------- pure parts


def fingerprint(params):
    """64-bit linear hash of the weights' bits: a different bit anywhere changes it."""
    blob = encode_params(params)
    words = np.frombuffer(blob + b"\0" * (-len(blob) % 8), np.uint64)
    return int(np.dot(words, _multipliers(len(words))))  # integer dot: wraps modulo 2**64


@functools.cache
def _multipliers(n):
    """n fixed odd 64-bit constants (the same in every process)."""
    return np.random.default_rng(0x5EED).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)


def chunked_grad_sums(params, x_uint8, labels, dtype, chunk=CHUNK_ROWS):
    """mlp.loss_and_grad_sums over uint8 rows, `chunk` rows at a time, partial sums added in order.

    A full-batch step over 30,000 rows scaled at once writes and rereads 94 MB of floats; in
    chunks the floats stay in cache (measured ~1.4x faster for one worker, and two workers then
    scale ~1.85x on two cores instead of ~1.75x).
    """
    total, loss_sum = None, 0.0
    for lo in range(0, len(labels), chunk):
        x = mlp.scale_pixels(x_uint8[lo:lo + chunk], dtype)  # (chunk, 784)
        grads, part_loss, _ = mlp.loss_and_grad_sums(params, x, labels[lo:lo + chunk])
        total = grads if total is None else optim.add_into(total, grads)
        loss_sum += part_loss
    return total, loss_sum, len(labels)


def factors(params, x, labels):
    """(deltas [layer 1..L] each (B, out_i), hidden activations [1..L-1] each (B, size_i), loss sum)."""
    n_layers = len(params) // 2
    logits, cache = mlp.forward(params, x)
    loss_sum, delta = mlp.xent_loss_and_dlogits(logits, labels)
    deltas = [delta]
    for i in range(n_layers, 1, -1):
        delta = (delta @ params[f"W{i}"]) * (cache[i - 1] > 0)  # (B, in_i), as mlp.backward
        deltas.append(delta)
    return deltas[::-1], cache[1:n_layers], loss_sum


def grads_from_factors(deltas, hidden, x):
    """Gradient sums keyed like params from one worker's factors and its scaled pixel rows x."""
    acts = [x, *hidden]
    grads = {}
    for i in range(len(deltas), 0, -1):
        grads[f"W{i}"] = deltas[i - 1].T @ acts[i - 1]  # (out_i, in_i)
        grads[f"b{i}"] = deltas[i - 1].sum(axis=0)  # (out_i,)
    return {name: grads[name] for name in mlp.param_names(len(deltas))}


def encode_factors(deltas, hidden, dtype):
    return b"".join(np.ascontiguousarray(a, dtype=dtype).tobytes() for a in (*deltas, *hidden))


def decode_factors(buf, rows, sizes, dtype):
    """Inverse of encode_factors for `rows` examples: (deltas, hidden) as read-only views."""
    flat = np.frombuffer(buf, dtype=dtype)
    out, at = [], 0
    for width in (*sizes[1:], *sizes[1:-1]):
        out.append(flat[at:at + rows * width].reshape(rows, width))
        at += rows * width
    n_layers = len(sizes) - 1
    return out[:n_layers], out[n_layers:]


def owners(batch, starts):
    """The rank whose shard holds each global index."""
    return np.searchsorted(starts, batch, side="right") - 1


def per_worker_grads(batch, payloads, starts, train_x, sizes, dtype):
    """{rank: gradient sums} rebuilt from each worker's factor payload, for ranks with examples."""
    owner = owners(batch, starts)
    out = {}
    for rank, buf in enumerate(payloads):
        rows = batch[owner == rank]
        if len(rows):
            deltas, hidden = decode_factors(buf, len(rows), sizes, dtype)
            out[rank] = grads_from_factors(deltas, hidden, mlp.scale_pixels(train_x[rows], dtype))
    return out


def total_grads(parts):
    """Sum of per-worker gradient sums in rank order, as the actor path adds them."""
    total = None
    for rank in sorted(parts):
        total = {k: g.copy() for k, g in parts[rank].items()} if total is None else optim.add_into(total, parts[rank])
    return total


def encode_params(params):
    return b"".join(np.ascontiguousarray(params[name]).tobytes() for name in mlp.param_names(len(params) // 2))


def decode_params(buf, sizes, dtype):
    flat = np.frombuffer(buf, dtype=dtype)
    params, at = {}, 0
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        params[f"W{i}"] = flat[at:at + fan_out * fan_in].reshape(fan_out, fan_in).copy()
        at += fan_out * fan_in
        params[f"b{i}"] = flat[at:at + fan_out].copy()
        at += fan_out
    return params


def encode_request(op, step, fp, batch, sync=None, pending=None):
    """One request for every worker.

    sync: (params, lr, sizes, starts, test bounds) to (re)start the replicas, or None;
    pending: (step, batch, every worker's factor payload in rank order) of the previous step,
    whose update the training loop made, or None.
    """
    batch = np.empty(0, np.int64) if batch is None else np.asarray(batch, np.int64)
    prev_step, prev_batch, payloads = pending if pending is not None else (-1, np.empty(0, np.int64), [])
    head = _REQUEST.pack(op, step, fp, len(batch), 0 if sync is None else len(sync[3]), prev_step, len(prev_batch))
    parts = [head, batch.tobytes(), np.asarray(prev_batch, np.int64).tobytes()]
    if sync is not None:
        params, lr, sizes, starts, test_bounds = sync
        parts += [struct.pack("<dq", lr, len(sizes)), np.asarray(sizes, np.int64).tobytes(),
                  np.asarray(starts, np.int64).tobytes(), np.asarray(test_bounds, np.int64).tobytes(),
                  encode_params(params)]
    return b"".join([*parts, *payloads])


def decode_request(blob, dtype):
    """(op, step, fp, batch, sync or None, pending or None) as encode_request took them.

    The pending payload comes whole (a memoryview); split_payloads cuts it per worker.
    """
    op, step, fp, n_batch, n_workers, prev_step, n_prev = _REQUEST.unpack_from(blob)
    at = _REQUEST.size
    batch = np.frombuffer(blob, np.int64, n_batch, at)
    prev_batch = np.frombuffer(blob, np.int64, n_prev, at + 8 * n_batch)
    at += 8 * (n_batch + n_prev)
    sync = None
    if n_workers:
        lr, n_sizes = struct.unpack_from("<dq", blob, at)
        at += 16
        ints = np.frombuffer(blob, np.int64, n_sizes + 3 * n_workers, at)
        sizes, starts = tuple(int(s) for s in ints[:n_sizes]), ints[n_sizes:n_sizes + n_workers]
        test_bounds = ints[n_sizes + n_workers:].reshape(n_workers, 2)
        at += 8 * len(ints)
        n_params = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        params = decode_params(memoryview(blob)[at:at + n_params * np.dtype(dtype).itemsize], sizes, dtype)
        at += n_params * np.dtype(dtype).itemsize
        sync = (params, lr, sizes, starts, test_bounds)
    pending = (prev_step, prev_batch, memoryview(blob)[at:]) if prev_step >= 0 else None
    return op, step, fp, batch, sync, pending


def split_payloads(payload, batch, starts, sizes, dtype):
    """The concatenated factor payloads of a step cut into one per rank."""
    counts = np.bincount(owners(batch, starts), minlength=len(starts))
    row = (sum(sizes[1:]) + sum(sizes[1:-1])) * np.dtype(dtype).itemsize
    cuts = np.concatenate([[0], np.cumsum(counts)]) * row
    return [payload[cuts[r]:cuts[r + 1]] for r in range(len(starts))]


def reply_status(reply):
    return _REPLY.unpack_from(reply)[0]


def reply_payload(reply):
    return memoryview(reply)[_REPLY.size:]


# ------------------------------------------------------------------------- worker side


class Replica:
    """A worker's copy of the weights, kept equal to the driver's by applying the same updates."""

    def __init__(self, rank, node_data, dtype):
        self.rank, self.dtype = rank, np.dtype(dtype).type
        self.train_x, self.train_y, self.all_test_x, self.all_test_y = node_data  # the node's copy
        self.params, self.applied = None, None

    def handle(self, blob):
        """One request -> this worker's reply: its factors, its evaluation sums, or SYNC."""
        t0 = time.perf_counter()
        op, step, fp, batch, sync, pending = decode_request(blob, self.dtype)
        if sync is not None:
            self.params, self.lr, self.sizes, self.starts, test_bounds = sync
            self.test_range = slice(*test_bounds[self.rank])
        elif pending is not None and self.params is not None and self.applied != pending[0]:
            self._apply(*pending)
        if self.params is None or fingerprint(self.params) != fp:
            self.params = None
            return _REPLY.pack(SYNC, 0, 0.0, 0.0)
        if op == OP_EVAL:
            x, y = self.all_test_x[self.test_range], self.all_test_y[self.test_range]
            correct, loss_sum, n = mlp.evaluate_sums(self.params, mlp.scale_pixels(x, self.dtype), y)
            return _REPLY.pack(OK, correct, loss_sum, time.perf_counter() - t0) + struct.pack("<q", n)
        mine = batch[owners(batch, self.starts) == self.rank]
        if not len(mine):
            return _REPLY.pack(OK, 0, 0.0, time.perf_counter() - t0)
        x = mlp.scale_pixels(self.train_x[mine], self.dtype)
        deltas, hidden, loss_sum = factors(self.params, x, self.train_y[mine])
        return _REPLY.pack(OK, len(mine), loss_sum, time.perf_counter() - t0) + encode_factors(deltas, hidden, self.dtype)

    def _apply(self, step, batch, payload):
        """The update the training loop made from step's gradient sums (once per step)."""
        payloads = split_payloads(payload, batch, self.starts, self.sizes, self.dtype)
        grads = total_grads(per_worker_grads(batch, payloads, self.starts, self.train_x, self.sizes, self.dtype))
        self.params, _ = optim.step(self.params, optim.mean_grads(grads, len(batch)), {}, self.lr)
        self.applied = step


def loss_total(replies, parts):
    """Loss sum over the ranks that had examples, added in rank order as the actor path does."""
    total = 0.0
    for rank in sorted(parts):
        total += _REPLY.unpack_from(replies[rank])[2]
    return total


def finite(grads, loss_sum):
    return bool(np.isfinite(loss_sum)) and all(np.isfinite(g).all() for g in grads.values())


# ------------------------------------------------------------------------- driver side


class GraphFailed(Exception):
    """The compiled graph broke (a worker died or timed out); the caller goes over actor calls."""


def eligible(job):
    """Whether the job's steps can use replicas: per-example or minibatch steps, plain SGD updates."""
    return job.optimizer.name in ("minibatch", "sgd") and job.optimizer.momentum == 0.0


class FastTransport:
    """Steps and evaluations of a RayBackend through one compiled graph over its actors.

    Each request carries the previous step's factors (when the loop applied that step), so
    the workers bring their replicas up to date before computing: one round trip per step.
    When the graph fails, the same request goes over plain actor calls (backend._call:
    restarts, failure budget) with the same arithmetic, so a recovered step gives the same bits.
    """

    def __init__(self, backend, job, train_x):
        self.backend = backend
        self.sizes, self.dtype = tuple(job.model.sizes), np.dtype(job.model.dtype).type
        self.lr = job.optimizer.learning_rate
        self.train_x = train_x  # (n, 784) uint8, the node copy the driver reads rows from
        self.graph, self.pending, self.graph_failures = None, None, 0
        # one BLAS thread while the transport is open: the workers' matmuls, so the same bits
        self.blas_limit = ThreadpoolController().limit(limits=1, user_api="blas")

    def _build(self):
        from ray.dag import InputNode, MultiOutputNode
        with InputNode() as request:
            dag = MultiOutputNode([a.fast_run.bind(request) for a in self.backend.actors])
        self.graph = dag.experimental_compile()

    def _execute(self, blob):
        """Every worker's reply to blob through the graph (built on first use)."""
        try:
            if self.graph is None:
                self._build()
            return ray.get(self.graph.execute(blob), timeout=self.backend.timeout)
        except Exception as e:  # any channel, actor or timeout error: the graph is unusable
            self.graph_failures += 1
            log.warning("compiled graph failed (%s); this step goes over actor calls", type(e).__name__)
            self._close_graph()
            raise GraphFailed from None

    def _send(self, blob, during):
        if self.graph_failures < MAX_GRAPH_FAILURES:
            try:
                return self._execute(blob)
            except GraphFailed:
                pass
        replies = self.backend._call({r: ("fast_run", (blob,)) for r in range(len(self.backend.actors))}, during)
        return [replies[r] for r in range(len(replies))]

    def _round(self, op, step, params, batch, during):
        """Replies of every worker; stale replicas (a new worker, a different update) get the weights."""
        fp = fingerprint(params)
        replies = self._send(encode_request(op, step, fp, batch, pending=self.pending), during)
        self.pending = None
        if any(map(reply_status, replies)):
            b = self.backend
            sync = (params, self.lr, self.sizes, b.starts, b.test_bounds)
            replies = self._send(encode_request(op, step, fp, batch, sync), during)
        return replies

    def grad_sums(self, params, batch, step):
        """trainer.StepResult for one step, rebuilt from the workers' factors."""
        from distmlp import trainer
        replies = self._round(OP_STEP, step, params, batch, f"step {step + 1}")
        t0 = time.perf_counter()
        payloads = [reply_payload(r) for r in replies]
        parts = per_worker_grads(batch, payloads, self.backend.starts, self.train_x, self.sizes, self.dtype)
        result = trainer.StepResult(total_grads(parts), loss_total(replies, parts), len(batch), 0.0)
        if trainer.is_finite(result):  # the loop applies exactly these steps
            self.pending = (step, batch, payloads)
        else:  # a non-finite part makes the total non-finite: name the first such worker
            bad = [r for r in sorted(parts) if not finite(parts[r], _REPLY.unpack_from(replies[r])[2])]
            result.bad_worker = f"{bad[0]} (pid {self.backend.worker_info[bad[0]]['pid']})" if bad else None
        result.compute_s = max(_REPLY.unpack_from(r)[3] for r in replies) + time.perf_counter() - t0
        return result

    def evaluate(self, params):
        """(correct, loss sum, count) over the held-out split, summed in rank order."""
        replies = self._round(OP_EVAL, 0, params, None, "evaluation")
        heads = [_REPLY.unpack_from(r) for r in replies]
        counts = [struct.unpack_from("<q", r, _REPLY.size)[0] for r in replies]
        return sum(h[1] for h in heads), sum(h[2] for h in heads), sum(counts)

    def close(self):
        self._close_graph()
        if self.blas_limit is not None:
            self.blas_limit.restore_original_limits()
            self.blas_limit = None

    def _close_graph(self):
        graph, self.graph = self.graph, None
        if graph is not None:
            try:
                graph.teardown()
            except Exception as e:  # a dead actor can make teardown complain; the graph is gone anyway
                log.debug("compiled graph teardown: %s", e)
