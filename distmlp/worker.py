"""The Ray worker actor: holds one shard of the training and held-out splits, returns sums.

A worker loads its own rows (from the IDX files, the bundled sample or Parquet shards) in
its constructor, so the data set never passes through the driver, and keeps them resident.
A restarted actor (after a crash) runs the constructor again and reloads its shard.
"""

import os
import time

# One BLAS thread per worker: the workers are the parallelism, oversubscribing cores only
# slows them down. Set before NumPy loads its BLAS in this process.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402
import ray  # noqa: E402

from distmlp import data, mlp  # noqa: E402

BLAS_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ShardWorker:
    """Training rows [train_start, train_stop) and held-out rows [test_start, test_stop)."""

    def __init__(self, rank, source, train_range, test_range, dtype="float32", node_data=None):
        self.rank = rank
        self.dtype = np.dtype(dtype).type
        self.train_range = train_range
        if node_data is None:
            self.node_data = None
            self.train_x, self.train_y = data.load_rows(source.train, *train_range)  # (n, 784) uint8
            self.test_x, self.test_y = data.load_rows(source.test, *test_range)
        else:  # [ref to the node's one copy of (train x, y, test x, y)]: zero-copy views of the shard
            self.node_data = ray.get(node_data[0])
            train_x, train_y, test_x, test_y = self.node_data
            self.train_x, self.train_y = train_x[slice(*train_range)], train_y[slice(*train_range)]
            self.test_x, self.test_y = test_x[slice(*test_range)], test_y[slice(*test_range)]
        self.replica = None
        self.mesh = None

    def info(self):
        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "pid": os.getpid(), "node_id": ctx.get_node_id(),
                "n_train": len(self.train_y), "n_test": len(self.test_y)}

    def grad_sums(self, params, local_indices, step):
        """Gradient sums over local_indices (None: the whole shard), tagged with the step."""
        t0 = time.perf_counter()
        if local_indices is None:  # the whole shard (gd): in cache-sized chunks (fastpath)
            from distmlp import fastpath
            grads, loss_sum, count = fastpath.chunked_grad_sums(params, self.train_x, self.train_y, self.dtype)
        else:
            x, y = self.train_x[local_indices], self.train_y[local_indices]
            grads, loss_sum, count = mlp.loss_and_grad_sums(params, mlp.scale_pixels(x, self.dtype), y)
        return step, grads, loss_sum, count, time.perf_counter() - t0

    def evaluate(self, params):
        return mlp.evaluate_sums(params, mlp.scale_pixels(self.test_x, self.dtype), self.test_y)


    # -- fast transport (distmlp.fastpath): a weight replica, driven through a compiled graph

    def fast_run(self, request):
        """fastpath.Replica.handle on this worker's replica (made on first use)."""
        if self.replica is None:
            from distmlp import fastpath
            self.replica = fastpath.Replica(self.rank, self.node_data, self.dtype)
        return self.replica.handle(request)


    # -- mesh transport (distmlp.mesh): rounds of steps, gradient sums shared with the other workers

    def mesh_run(self, start, request):
        """mesh.MeshWorker.run: steps request["first"].. from start = (params, opt_state)."""
        if self.mesh is None:
            from distmlp import mesh
            self.mesh = mesh.MeshWorker(self)
        return self.mesh.run(start, request)


RemoteShardWorker = ray.remote(ShardWorker)
