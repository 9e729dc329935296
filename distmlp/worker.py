"""The Ray worker actor: holds one shard of the training and held-out splits, returns sums.

A worker loads its own rows (from the IDX files, the bundled sample or Parquet shards) in its
constructor, so the data set never passes through the driver, and keeps them resident; where
every worker shares one node the node's single copy (put_per_node) is read without copying.
A restarted actor runs the constructor again and reloads its shard. Its process runs BLAS on
one thread (BLAS_ENV, set by the worker group): the workers are the parallelism.
"""

import os
import time

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from distmlp import data, kernels, mlp

BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ShardWorker:
    """Training rows [train_start, train_stop) and held-out rows [test_start, test_stop)."""

    def __init__(self, rank, source, train_range, test_range, dtype="float32", node_data=None, kernel="numpy"):
        self.rank = rank
        self.dtype = np.dtype(dtype).type
        self.kernel = kernels.make(kernel, dtype)
        self.train_range = train_range
        self.node_train = None  # every training row of the node (x, y), where the node has one copy
        if node_data is None:
            self.train_x, self.train_y = data.load_rows(source.train, *train_range)  # (n, 784) uint8
            self.test_x, self.test_y = data.load_rows(source.test, *test_range)
        else:  # [ref to the node's one copy of (train x, y, test x, y)]: zero-copy views of the shard
            train_x, train_y, test_x, test_y = ray.get(node_data[0])
            self.node_train = (train_x, train_y)
            self.train_x, self.train_y = train_x[slice(*train_range)], train_y[slice(*train_range)]
            self.test_x, self.test_y = test_x[slice(*test_range)], test_y[slice(*test_range)]
        self.held_out = self.kernel.held_out(self.test_x, self.test_y)
        self.mesh = None
        self.collective = None

    def info(self):
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "n_train": len(self.train_y), "n_test": len(self.test_y)}

    def grad_sums(self, params, local_indices, step, shared=None):
        """(step, gradient sums keyed like params, loss sum, count, seconds) over local_indices
        (None: the whole shard, in cache-sized chunks, which `shared`, a mesh.SharedBatch, shares
        with the node's other workers when given), by the job's kernel; the sums are rewritten by
        the next call."""
        t0 = time.perf_counter()
        if local_indices is None and shared is not None:
            grads, loss_sum, count = shared.grad_sums(params, step)
        else:
            grads, loss_sum, count = self.kernel.keyed_grad_sums(params, self.train_x, self.train_y, local_indices)
        return step, grads, loss_sum, count, time.perf_counter() - t0

    def evaluate(self, params):
        return self.held_out.evaluate(params)

    def mesh_run(self, start, request):
        """mesh.MeshWorker.run: steps request["first"].. from start = (params, opt_state)."""
        if self.mesh is None:
            from distmlp import mesh
            self.mesh = mesh.MeshWorker(self)
        return self.mesh.run(start, request)

    def collective_run(self, start, request):
        """collective.CollectiveWorker.run: steps request["first"].. from start = (params, opt_state)."""
        if self.collective is None:
            from distmlp import collective
            self.collective = collective.CollectiveWorker(self)
        return self.collective.run(start, request)


RemoteShardWorker = ray.remote(ShardWorker)


@ray.remote(num_cpus=0)
def _load_split_pair(source):
    return data.load_rows(source.train) + data.load_rows(source.test)  # (train x, y, test x, y)


def put_per_node(source, node_ids):
    """{node id: ref to (train x, train y, test x, test y)}: each split loaded once on each node."""
    return {node: _load_split_pair.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(source)
        for node in sorted(set(node_ids))}
