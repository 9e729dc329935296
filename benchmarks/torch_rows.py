"""The PyTorch, PyTorch DDP and Ray Train rows of the minibatch comparison (optional extra 'bench').

The same work as the other minibatch rows: MLP 784-16-16-10 with ReLU, softmax cross-entropy averaged
over a global batch of 32 drawn from synthetic MNIST-shaped uint8 data scaled by 1/255, plain SGD
(lr 0.05), float32, one torch thread per process; the median step after 10 % warm-up steps.
torch is imported only inside functions, so that benchmarks.run imports without it.
"""

import importlib.metadata
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta

import numpy as np

SECTION = "minibatch step (batch 32)"
BATCH = 32
LR = 0.05
WARMUP = 0.1
TIMEOUT = timedelta(seconds=60)

_listener = None  # rank 0's listening socket, served by its TCPStore for the life of the process


def rows(p, mesh_us):
    """The three torch rows and the mesh speed-ups over DDP and Ray Train, as 4-tuples of text."""
    single = single_process_us(p)
    ddp = ddp_us(p)
    train = ray_train_us(p)
    torch_version, ray_version = importlib.metadata.version("torch"), importlib.metadata.version("ray")
    share = f"{BATCH // 2} examples each per step; the slower one's step time"
    return [(SECTION, "PyTorch, 1 thread", f"{single:,.0f} us/step", f"torch {torch_version}, in the driver process"),
            (SECTION, "PyTorch DDP (gloo), 2 processes", f"{ddp:,.0f} us/step", f"on 127.0.0.1; {share}"),
            (SECTION, "Ray Train TorchTrainer, 2 workers", f"{train:,.0f} us/step",
             f"Ray {ray_version}, 0.5 CPU each, prepare_model (DDP, gloo); {share}"),
            ("", "speed-up mesh vs Ray Train", f"{train / mesh_us:.1f}x", ""),
            ("", "speed-up mesh vs DDP", f"{ddp / mesh_us:.1f}x", "")]


def single_process_us(p):
    """Median us per step in this, the driver, process: where the single-process NumPy row runs."""
    import torch

    torch.set_num_threads(1)
    return median_step_us(_mlp(), p["n_train"], p["steps"])


def ddp_us(p):
    """Median us per step of DistributedDataParallel over gloo in 2 fresh processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: the driver has Ray's threads running
    ctx = multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = [ctx.Process(target=_ddp_process, args=(rank, port, p["n_train"], p["steps"], results))
             for rank in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        raise RuntimeError(f"DDP processes exited with {[proc.exitcode for proc in procs]}")
    return results.get()


def _ddp_process(rank, port, n, steps, results):
    import torch

    torch.set_num_threads(1)
    if rank == 0:
        _listen_on_loopback(port)
    _join_gloo(rank, 2, port)
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    us = median_step_us(model, n, steps, rank, 2)
    torch.distributed.destroy_process_group()
    if rank == 0:
        results.put(us)


def ray_train_us(p):
    """Median us per step of a TorchTrainer with 2 workers of 0.5 CPU each, on the Ray already running."""
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory(prefix="distmlp-bench-ray-train-") as tmp:
        trainer = TorchTrainer(_train_loop, train_loop_config={"n": p["n_train"], "steps": p["steps"]},
                               torch_config=_loopback_torch_config(),
                               scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                                      resources_per_worker={"CPU": 0.5}),
                               run_config=ray.train.RunConfig(storage_path=tmp, name="torch-rows"))
        return trainer.fit().metrics["median_us"]


def _train_loop(config):
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    model = ray.train.torch.prepare_model(_mlp())
    us = median_step_us(model, config["n"], config["steps"], rank, context.get_world_size())
    # Ray Train keeps only metrics reported with a checkpoint (rank 0's)
    with tempfile.TemporaryDirectory() as empty:
        checkpoint = ray.train.Checkpoint.from_directory(empty) if rank == 0 else None
        ray.train.report({"median_us": us}, checkpoint=checkpoint)


def _loopback_torch_config():
    """A TorchConfig whose workers join a gloo process group served on 127.0.0.1 only.

    The stock one initialises from env://, whose TCPStore listens on every interface.
    """
    import ray
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _TorchBackend

    class LoopbackBackend(_TorchBackend):
        def on_start(self, worker_group, backend_config):
            port = worker_group.execute_single(0, _listen_on_loopback)
            size = len(worker_group)
            ray.get([worker_group.execute_single_async(rank, _join_gloo, rank, size, port) for rank in range(size)])

    class LoopbackTorchConfig(TorchConfig):
        @property
        def backend_cls(self):
            return LoopbackBackend

    return LoopbackTorchConfig(backend="gloo")


def _listen_on_loopback(port=0):
    """The port of a new listening socket on 127.0.0.1, kept for this process's TCPStore."""
    global _listener
    _listener = socket.create_server(("127.0.0.1", port))
    return _listener.getsockname()[1]


def _join_gloo(rank, world_size, port):
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.TCPStore("127.0.0.1", port, world_size, rank == 0, TIMEOUT,
                          master_listen_fd=_listener.fileno() if rank == 0 else None)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)


def _mlp():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 10))


def median_step_us(model, n, steps, rank=0, world_size=1):
    """Median us per SGD step of model on this rank's share of each global batch (the slowest rank's time)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)  # the same data and batches on every rank
    x = torch.from_numpy(rng.integers(0, 256, (n, 784), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, n))
    share = BATCH // world_size
    batches = [torch.from_numpy(rng.choice(n, BATCH, replace=False)[rank * share:(rank + 1) * share])
               for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    times = []
    for idx in batches:
        t0 = time.perf_counter()
        # the mean over this rank's share; DDP averages the gradients over the ranks: the global batch mean
        loss = F.cross_entropy(model(x[idx].float() / 255), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t0)
    times = torch.tensor(times, dtype=torch.float64)
    if world_size > 1:
        torch.distributed.all_reduce(times, op=torch.distributed.ReduceOp.MAX)
    return statistics.median(times[int(steps * WARMUP):].tolist()) * 1e6
