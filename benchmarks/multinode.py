"""Steps across nodes: actor calls, Ray's collectives and Ray Train on a real 3-node Ray on 127.0.0.1.

    python -m benchmarks.multinode            # 1,500 minibatch steps per run, 3 interleaved rounds
    python -m benchmarks.multinode --quick    # few steps: checks that everything runs

The cluster is started here with `ray start` (benchmarks.localcluster: a head with no CPUs and
two 1-CPU nodes, every process on 127.0.0.1, token authentication with a token of its own, a
temporary directory of its own) and stopped at the end, its processes only: other Rays on the
machine are left alone. On it: distmlp minibatch steps (global batch 32, mnist-sample) with 2 workers on the two
nodes over actor calls and over the collective transport, the same with 4 workers (half a CPU
each), and, when torch and ray[train] are installed, a Ray Train TorchTrainer with 2 workers
spread over the two nodes (benchmarks.torch_rows' loop). Each row is the median over rounds of
the median step time of a run (the first 10 % of steps left out). With torch, gd epochs on
synthetic MNIST-shaped data (60,000 x 784, as benchmarks.run writes it) with 1 worker and with 2
workers on the two nodes over the collective transport, 5 interleaved rounds (the first 20 % of a
run's steps left out).
"""

import argparse
import importlib.util
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.localcluster import LocalCluster  # noqa: E402
from benchmarks.run import StepTimes, report, synthetic_mnist  # noqa: E402
from distmlp import config, data, trainer, transport  # noqa: E402

FULL = {"steps": 1500, "rounds": 3, "train_steps": 1500, "n_train": 60000, "n_test": 10000, "gd_steps": 12,
        "gd_rounds": 5}
QUICK = {"steps": 20, "rounds": 1, "train_steps": 20, "n_train": 1000, "n_test": 200, "gd_steps": 2, "gd_rounds": 1}


def job(workers, transport_name, steps, optimizer="minibatch"):
    """At most one CPU per worker: the two nodes' CPUs are shared by 4 workers."""
    return config.load_job(None, [f"optimizer.name='{optimizer}'", "optimizer.batch_size=32", "optimizer.lr=0.05",
                                  f"run.steps={steps}", f"cluster.workers={workers}",
                                  f"cluster.cpus_per_worker={min(1, 2 / workers):g}",
                                  f"cluster.transport='{transport_name}'"])


def distmlp_step_s(workers, transport_name, steps, source, optimizer="minibatch", skip=0.1):
    """(median seconds per step, the transport that ran, nodes used) of one run."""
    j = job(workers, transport_name, steps, optimizer)
    backend = transport.start(source, j)
    try:
        times = StepTimes()
        trainer.train(j, backend, hooks=[times])
        return times.median("step_s", skip), type(backend).__name__, len(backend.group.nodes())
    finally:
        backend.close()


def gd_epochs(source, p, rows):
    """gd seconds per epoch (a step sees every example) with 1 worker and with 2 workers on the two
    nodes, both over the collective transport; rounds interleaved, the spread over rounds shown."""
    seconds, ran = {1: [], 2: []}, {}
    for _ in range(p["gd_rounds"]):
        for workers, values in seconds.items():
            s, ran[workers], nodes = distmlp_step_s(workers, "collective", p["gd_steps"], source, "gd", skip=0.2)
            if nodes != workers:
                raise RuntimeError(f"{workers} gd worker(s) ran on {nodes} node(s)")
            values.append(s)
    section = f"gd epoch ({source.train.count:,} x 784), across nodes"
    med = {workers: statistics.median(values) for workers, values in seconds.items()}
    for workers, values in seconds.items():
        rows.append((section, f"Ray, collective allgather, {workers} worker(s)", f"{med[workers]:.3f} s/epoch",
                     f"{ran[workers]}; {len(values)} rounds, {min(values):.3f}-{max(values):.3f} s"))
    rows.append(("", "speed-up 2 workers on 2 nodes vs 1", f"{med[1] / med[2]:.2f}x",
                 f"rounds {min(seconds[1]) / max(seconds[2]):.2f}-{max(seconds[1]) / min(seconds[2]):.2f}x; "
                 "target >= 1.7x"))


def ray_train_us(steps):
    """Median us per step of a TorchTrainer with 2 workers spread over the two nodes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from benchmarks import torch_rows
    with tempfile.TemporaryDirectory(prefix="distmlp-bench-ray-train-") as tmp:
        fit = TorchTrainer(torch_rows._train_loop, train_loop_config={"n": 8000, "steps": steps},
                           torch_config=torch_rows._loopback_torch_config(),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                                  resources_per_worker={"CPU": 1},
                                                                  placement_strategy="STRICT_SPREAD"),
                           run_config=ray.train.RunConfig(storage_path=tmp, name="multinode")).fit()
        return fit.metrics["median_us"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    with_torch = importlib.util.find_spec("torch") is not None
    with_train = with_torch and importlib.util.find_spec("ray.train.torch") is not None
    cluster = LocalCluster()
    import ray
    gd_rows = []
    try:
        cluster.connect()
        if with_torch:
            with tempfile.TemporaryDirectory(prefix="distmlp-bench-") as tmp:
                gd_epochs(synthetic_mnist(Path(tmp), p["n_train"], p["n_test"]), p, gd_rows)
        source = data.resolve("mnist-sample")
        candidates = {(2, "actors"): [], (4, "actors"): []}
        if with_torch:
            candidates.update({(2, "collective"): [], (4, "collective"): []})
        ran = {}
        for _ in range(p["rounds"]):  # interleaved: the machine's load changes under every candidate alike
            for (workers, name), medians in candidates.items():
                s, ran[workers, name], nodes = distmlp_step_s(workers, name, p["steps"], source)
                if nodes != 2:
                    raise RuntimeError(f"{workers} workers ({name}) ran on {nodes} node(s), not 2")
                medians.append(s * 1e6)
        train = statistics.median(ray_train_us(p["train_steps"]) for _ in range(p["rounds"])) if with_train else None
    finally:
        ray.shutdown()
        cluster.stop()
    us = {key: statistics.median(medians) for key, medians in candidates.items()}
    section = "minibatch step (batch 32), across 2 nodes"
    rows = []
    for workers in (2, 4):
        rows.append((section, f"Ray, actor calls, {workers} workers", f"{us[workers, 'actors']:,.0f} us/step",
                     f"{ran[workers, 'actors']}"))
        if with_torch:
            rows.append((section, f"Ray, collective allgather, {workers} workers",
                         f"{us[workers, 'collective']:,.0f} us/step", f"{ran[workers, 'collective']}"))
            rows.append(("", f"speed-up collective vs actor calls, {workers} workers",
                         f"{us[workers, 'actors'] / us[workers, 'collective']:.2f}x", ""))
    if train is not None:
        rows.append((section, "Ray Train TorchTrainer, 2 workers", f"{train:,.0f} us/step",
                     "STRICT_SPREAD, DDP (gloo) on 127.0.0.1; 16 examples each"))
        rows.append(("", "speed-up collective vs Ray Train, 2 workers", f"{train / us[2, 'collective']:.2f}x", ""))
    elif not with_torch:
        rows.append((section, "collective, gd and Ray Train rows", "-", "torch not installed (optional extra 'bench')"))
    else:
        rows.append((section, "Ray Train TorchTrainer", "-", "ray[train] not installed (optional extra 'bench')"))
    rows += gd_rows
    report("distmlp multi-node benchmark", f"{'quick' if args.quick else 'full'}, {p['steps']} steps x {p['rounds']} rounds",
           load_start, rows)


if __name__ == "__main__":
    main()
