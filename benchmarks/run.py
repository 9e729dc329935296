"""Every performance comparison of issue 7 in one run; prints a table of medians and ratios.

    python -m benchmarks.run            # 60,000 x 784 synthetic MNIST-shaped data (a few minutes)
    python -m benchmarks.run --quick    # small data, few steps: checks that everything runs

Timings on a shared machine are noisy: each comparison runs its candidates side by side,
interleaved over several rounds, and reports medians and ratios from the same run.
"""

import argparse
import dataclasses
import importlib.util
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep the embedded Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks import plain_gd, runahead  # noqa: E402
from distmlp import config, connect, data, metrics, trainer, transport  # noqa: E402

MESH = "Ray, shared-memory mesh (transport auto), 2 workers"
SEED_REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "seed_reference.py"
QUICKSTART = Path(__file__).resolve().parent.parent / "jobs" / "quickstart.toml"
FULL = {"n_train": 60000, "n_test": 10000, "steps": 1500, "rounds": 3, "gd_rounds": 5, "gd_steps": 12, "seed_images": 300,
        "cli_steps": (1000, 151000), "cli_epochs": (10, 610), "cli_rounds": 5, "kernel_workers": (0, 2),
        "plain_epochs": 60, "plain_rounds": 5, "peer_steps": 20000, "peer_rounds": 5}
QUICK = {"n_train": 1000, "n_test": 200, "steps": 20, "rounds": 1, "gd_rounds": 1, "gd_steps": 2, "seed_images": 32,
         "cli_steps": (10, 20), "cli_epochs": (1, 2), "cli_rounds": 1,
         "plain_epochs": 2, "plain_rounds": 1, "peer_steps": 300, "peer_rounds": 1,
         "kernel_workers": (0,)}  # the mesh's CLI runs are the 2-worker rows' code path already


def write_idx(directory, name, array, magic):
    """One uncompressed IDX file of unsigned bytes."""
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    (directory / name).write_bytes(head + array.tobytes())


def synthetic_mnist(directory, n_train, n_test, seed=0):
    """Random MNIST-shaped IDX files (uint8 28x28 images, labels 0-9) in directory."""
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory, f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  data.IMAGES_MAGIC)
        write_idx(directory, f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8),
                  data.LABELS_MAGIC)
    return data.from_directory(directory, name="synthetic-mnist")


def job(optimizer, workers=1, transport="auto", **run):
    overrides = [f'optimizer.name="{optimizer}"', f"cluster.workers={workers}", "cluster.cpus_per_worker=0.5",
                 f'cluster.transport="{transport}"', "optimizer.lr=0.05"]
    return config.replace(config.load_job(None, overrides), run=run)


class StepTimes(trainer.Hook):
    """Hook: the per-step wall, compute and communication times of a run."""

    def __init__(self):
        self.records = []

    def on_step(self, state, record):
        self.records.append(record)

    def median(self, key, skip=0.1):
        values = [r[key] for r in self.records[int(len(self.records) * skip):]]
        return statistics.median(values)


def run_local(j, source):
    times = StepTimes()
    trainer.train(j, trainer.LocalBackend(source), hooks=[times])
    return times


def run_ray(j, source, measure=None):
    """(step times, measure(backend) taken before the workers stop)."""
    backend = transport.start(source, j)
    try:
        times = StepTimes()
        trainer.train(j, backend, hooks=[times])
        return times, measure(backend) if measure else None
    finally:
        backend.close()


def worker_memory(backend):
    """Summed RSS, PSS, USS and peak RSS of the worker processes in MB, from /proc (Linux)."""
    total = {"rss": 0, "pss": 0, "uss": 0, "peak": 0}
    for info in backend.group.worker_info:
        kb = _proc_kb(info["pid"], "smaps_rollup") | _proc_kb(info["pid"], "status")
        total["rss"] += kb["Rss"]
        total["pss"] += kb["Pss"]
        total["uss"] += kb["Private_Clean"] + kb["Private_Dirty"]
        total["peak"] += kb["VmHWM"]
    return {key: value / 1024 for key, value in total.items()}


def _proc_kb(pid, name):
    """{field: kB} of the "Field:   123 kB" lines of /proc/<pid>/<name>."""
    out = {}
    with open(f"/proc/{pid}/{name}") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


# ----------------------------------------------------------------------------- sections


def minibatch_steps(source, p, rows):
    """Target 1: us per synchronous minibatch step (global batch 32), 2 workers."""
    candidates = {"single-process NumPy": lambda j: run_local(j, source),
                  "Ray, actor calls": lambda j: run_ray(config.replace(j, cluster={"transport": "actors", "workers": 2}), source)[0],
                  MESH: lambda j: run_ray(config.replace(j, cluster={"transport": "mesh", "workers": 2}), source)[0],
                  "Ray, shared-memory mesh, 1 worker": lambda j: run_ray(config.replace(j, cluster={"transport": "mesh", "workers": 1}), source)[0]}
    medians = {name: [] for name in candidates}
    splits = {name: [] for name in candidates}
    for _ in range(p["rounds"]):
        for name, fn in candidates.items():
            steps = p["steps"] if "actor calls" not in name else max(p["steps"] // 3, 20)
            t = fn(job("minibatch", steps=steps))
            medians[name].append(t.median("step_s") * 1e6)
            splits[name].append((t.median("compute_s") * 1e6, t.median("comm_s") * 1e6))
    for name in candidates:
        us = statistics.median(medians[name])
        compute, comm = (statistics.median(s[i] for s in splits[name]) for i in (0, 1))
        rows.append(("minibatch step (batch 32)", name, f"{us:,.0f} us/step",
                     f"compute {compute:,.0f} / comm {comm:,.0f} us"))
    med = {name: statistics.median(v) for name, v in medians.items()}
    actors = med["Ray, actor calls"]
    rows.append(("", "speed-up mesh vs actor calls", f"{actors / med[MESH]:.1f}x",
                 f"target 1: <= 500 us/step; {'met' if med[MESH] <= 500 else 'not met'}"))
    rows.append(("", "mesh vs single-process NumPy", f"{med[MESH] / med['single-process NumPy']:.2f}x", "time ratio"))
    _torch_rows(rows, p, med[MESH])
    return med[MESH] / 1e6, med["single-process NumPy"] / 1e6


def _torch_rows(rows, p, mesh_us):
    """Appends the PyTorch, DDP and Ray Train rows, or one "skipped" row without torch."""
    if importlib.util.find_spec("torch") is None:
        rows.append(("", "PyTorch / Ray Train", "skipped", "torch not installed (optional extra 'bench')"))
        return
    from benchmarks import torch_rows
    rows.extend(torch_rows.rows(p, mesh_us))


def gd_epochs(source, p, rows):
    """Targets 2 and 3: gd s/epoch for 1 and 2 workers vs the single-process trainer; worker memory."""
    from threadpoolctl import threadpool_limits
    times = {"single-process trainer": [], "single-process, 1 BLAS thread": [], "Ray, 1 worker": [],
             "Ray, 2 workers": [], PLAIN[1]: [], PLAIN[2]: []}
    memory = {}
    for _ in range(p["gd_rounds"]):
        j = job("gd", steps=p["gd_steps"])
        times["single-process trainer"].append(run_local(j, source).median("step_s", skip=0.2))
        with threadpool_limits(1, user_api="blas"):  # as in a worker
            times["single-process, 1 BLAS thread"].append(run_local(j, source).median("step_s", skip=0.2))
        for workers in (1, 2):
            t, mem = run_ray(config.replace(j, cluster={"workers": workers}), source, worker_memory)
            times[f"Ray, {workers} worker{'s' * (workers > 1)}"].append(t.median("step_s", skip=0.2))
            memory[workers] = mem
            times[PLAIN[workers]].append(plain_processes(source, workers, p["gd_steps"]))
    med = {name: statistics.median(v) for name, v in times.items()}
    best = {name: min(v) for name, v in times.items()}
    for name, s in med.items():
        rows.append((f"gd epoch ({source.train.count:,} x 784)", name, f"{s:.3f} s/epoch",
                     f"best of {len(times[name])} rounds {best[name]:.3f} s"))
    rows.append(("", "speed-up 2 plain processes vs 1", f"{med[PLAIN[1]] / med[PLAIN[2]]:.2f}x",
                 f"best rounds {best[PLAIN[1]] / best[PLAIN[2]]:.2f}x: this machine's ceiling for the same code"))
    for label, t in (("", med), ("best rounds: ", best)):
        one, two = t["Ray, 1 worker"], t["Ray, 2 workers"]
        local, local_1 = t["single-process trainer"], t["single-process, 1 BLAS thread"]
        rows.append(("", f"{label}speed-up 2 workers vs 1", f"{one / two:.2f}x", "target 2: >= 1.8x"))
        rows.append(("", f"{label}1 worker vs single-process", f"{(one / local - 1) * 100:+.0f} %",
                     f"vs 1 BLAS thread {(one / local_1 - 1) * 100:+.0f} %; target 2: within 15 %"))
    for workers, mem in memory.items():
        rows.append(("worker memory after gd", f"{workers} worker(s), total", f"RSS {mem['rss']:.0f} MB",
                     f"PSS {mem['pss']:.0f} MB, USS {mem['uss']:.0f} MB, peak RSS {mem['peak']:.0f} MB"))
    ratio = {key: memory[2][key] / memory[1][key] for key in memory[1]}
    rows.append(("", "2 workers / 1 worker", f"RSS {ratio['rss']:.2f}x",
                 f"PSS {ratio['pss']:.2f}x, USS {ratio['uss']:.2f}x, peak {ratio['peak']:.2f}x; target 3: < 1.5x"))
    bare = bare_actor_rss()
    above = {w: memory[w]["rss"] - w * bare for w in memory}
    rows.append(("", "a bare Ray actor (no data)", f"RSS {bare:.0f} MB",
                 f"above n x bare: 1 worker {above[1]:.0f} MB, 2 workers {above[2]:.0f} MB "
                 f"({above[2] / above[1]:.2f}x)"))


PLAIN = {1: "no Ray: mesh worker loop, 1 process", 2: "no Ray: mesh worker loop, 2 processes"}


def plain_processes(source, workers, steps):
    """Median s/step of gd over the mesh's worker loop (distmlp.mesh.MeshWorker, the code a Ray
    worker runs) in plain processes without Ray: what this machine gives the same work."""
    import multiprocessing
    import shutil
    ctx = multiprocessing.get_context("spawn")  # this process runs Ray's threads: no fork
    directory = tempfile.mkdtemp(prefix="distmlp-bench-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None)
    try:
        with ctx.Pool(workers) as pool:
            per_rank = pool.starmap(_plain_worker, [(source, rank, workers, steps, directory) for rank in range(workers)])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    walls = [max(rank[i] for rank in per_rank) for i in range(len(per_rank[0]))]
    return statistics.median(walls[int(len(walls) * 0.2):])


def _plain_worker(source, rank, workers, steps, directory):
    from threadpoolctl import threadpool_limits

    from distmlp import mesh, trainer
    from distmlp.worker import ShardWorker
    threadpool_limits(1, user_api="blas")
    j = job("gd", workers=workers, steps=steps)
    worker = ShardWorker(rank, source, data.shard_bounds(source.train.count, workers)[rank],
                         data.shard_bounds(source.test.count, workers)[rank])
    state = trainer.initial_state(j)
    request = {"gen": 0, "dir": directory, "workers": workers, "first": 0, "stop": steps, "lr": 0.05,
               "momentum": 0.0, "sampler": trainer.make_sampler(j, source.train.count), "timeout": 60.0,
               "round_s": 1e9, "eval_every": 0, "steps": steps}
    out = mesh.MeshWorker(worker).run((state.params, state.opt_state), request)
    return [record[3] for record in out["steps"]]


def bare_actor_rss():
    """RSS in MB of an idle Ray actor that imports nothing: the fixed cost of a worker process."""
    import ray

    @ray.remote(num_cpus=0.5)
    class Bare:
        def pid(self):
            return os.getpid()

    actor = Bare.remote()
    try:
        return _proc_kb(ray.get(actor.pid.remote()), "smaps_rollup")["Rss"] / 1024
    finally:
        ray.kill(actor)


def seed_loop(source, p, rows, fast_step_s, local_step_s):
    """Target 4: one minibatch epoch vs the seed's per-example loop, extrapolated from a few images."""
    spec = importlib.util.spec_from_file_location("seed_reference", SEED_REFERENCE)
    seed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seed)
    n = p["seed_images"]
    x, y = data.load_rows(source.train, 0, n)
    images, labels = seed.images_from_uint8(x), y.tolist()
    rng = random.Random(0)
    weights_biases = seed.fresh_weights_biases(rng)
    weights = [weights_biases[k] for k in seed.PICKLE_KEYS[0::2]]
    biases = [weights_biases[k] for k in seed.PICKLE_KEYS[1::2]]
    batches = max(n // 32, 1)
    t0 = time.perf_counter()
    seed.SGD_minibatch(images, labels, weights, biases, minibatch_size=32, batches=batches, rng=rng)
    per_example = (time.perf_counter() - t0) / (batches * 32)
    n_epoch = 60000
    seed_epoch = per_example * n_epoch
    steps = n_epoch // 32
    rows.append(("minibatch epoch (60,000 images)", "seed per-example loop (extrapolated)",
                 f"{seed_epoch:,.0f} s", f"measured {per_example * 1e3:.2f} ms/example on {batches * 32} images"))
    if fast_step_s is not None:  # None: only the end-to-end rows were asked for
        rows.append(("", "Ray, mesh, 2 workers", f"{fast_step_s * steps:.2f} s",
                     f"{steps} steps x median step; {seed_epoch / (fast_step_s * steps):,.0f}x faster (target 4: >= 500x)"))
        rows.append(("", "single-process NumPy", f"{local_step_s * steps:.2f} s",
                     f"{seed_epoch / (local_step_s * steps):,.0f}x faster"))
    return seed_epoch


def cli_run(args, run_dir):
    """(wall seconds from outside, Inside) of `distmlp train ARGS`, a subprocess with its own
    embedded Ray, as a user runs it; Inside: what its metrics.jsonl says."""
    import json
    import subprocess
    cmd = [str(Path(sys.executable).with_name("distmlp")), "train", *args, "--run-dir", str(run_dir), "--json"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=os.environ | {"RAY_ADDRESS": "local"})
    wall = time.perf_counter() - t0
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    records = [r for r in records if metrics.EVENT not in r]
    steps = [r["step_s"] for r in records[len(records) // 10:]]
    # a record's wall_s is when the loop handled it (at the end of its round), counted from the
    # loop's start: the last one's covers every round, the first included
    loop = records[-1]["wall_s"] / records[-1]["step"]
    return wall, Inside(statistics.median(steps), statistics.fmean(steps), loop)


@dataclasses.dataclass
class Inside:
    """A run's steps as recorded inside it (seconds per step; the first 10 % of steps left out
    of the median and mean): the median and mean step_s, and the loop's wall time per step
    (wall_s of the last record over its step: steps, evaluations, hooks, round ends)."""

    median: float
    mean: float
    loop: float


def cli_minibatch_step(data_dir, p, tmp, runs, workers=2, kernel="numpy"):
    """(per step from outside, Inside) of CLI minibatch-32 runs on data_dir (cli_per_step)."""
    return cli_per_step(["--data", str(data_dir), "--optimizer", "minibatch", "--batch-size", "32",
                         "--workers", str(workers), "--lr", "0.05", "--set", "run.eval_every=250",
                         "--set", "cluster.cpus_per_worker=0.5", "--set", f'model.kernel="{kernel}"'],
                        p, tmp, runs)


def cli_per_step(args, p, tmp, runs):
    """(per step from outside, Inside) of `distmlp train ARGS`: the difference of a short and a
    long run divided by the difference in steps (start-up cancels out), next to what the long
    run recorded inside its loop (metrics.jsonl); medians of p["cli_rounds"] rounds."""
    short, long_ = p["cli_steps"]
    outside, inside = [], []
    for _ in range(p["cli_rounds"]):
        a, _ = cli_run([*args, "--steps", str(short)], tmp / str(next(runs)))
        b, seen = cli_run([*args, "--steps", str(long_)], tmp / str(next(runs)))
        outside.append((b - a) / (long_ - short))
        inside.append(seen)
    return statistics.median(outside), Inside(*(statistics.median(getattr(i, f.name) for i in inside)
                                                for f in dataclasses.fields(Inside)))


def end_to_end(data_dir, p, rows, seed_epoch_s):
    """Issue 15: the step a user sees, the CLI from outside, and the gd epoch with 1 and 2 workers."""
    tmp = Path(tempfile.mkdtemp(prefix="distmlp-e2e-"))
    runs = iter(range(10**6))
    short, long_ = p["cli_steps"]
    per_step, inside = cli_minibatch_step(data_dir, p, tmp, runs)
    rows.append(("end to end (CLI, minibatch 32, 2 workers)", "from outside: (long - short run) / steps",
                 f"{per_step * 1e6:,.0f} us/step", f"{short} and {long_} steps, eval every 250, checkpoint at the end"))
    rows.append(("", "inside: median step_s of metrics.jsonl", f"{inside.median * 1e6:,.0f} us/step",
                 f"outside / inside {per_step / inside.median:.2f}x (target: <= 1.25x)"))
    rows.append(("", "inside: mean step_s; the loop's wall_s per step", f"{inside.mean * 1e6:,.0f} us/step",
                 f"loop {inside.loop * 1e6:,.0f} us/step (steps, evaluations, hooks, round ends)"))
    # the README's first command as it is (the bundled sample: 8,000 rows, 2,000 held out, 2
    # workers, evaluated every 250 steps), only longer
    quick_step, quick_inside = cli_per_step([str(QUICKSTART)], p, tmp, runs)
    rows.append(("", "jobs/quickstart.toml: from outside", f"{quick_step * 1e6:,.0f} us/step",
                 f"inside: median {quick_inside.median * 1e6:,.0f}, mean {quick_inside.mean * 1e6:,.0f}, loop "
                 f"{quick_inside.loop * 1e6:,.0f} us/step; outside / inside {quick_step / quick_inside.median:.2f}x "
                 "(target: <= 1.25x)"))
    # the same job in one process (cluster.workers = 0, no Ray): what Ray's processes add to the tail
    one_step, one_inside = cli_per_step([str(QUICKSTART), "--workers", "0"], p, tmp, runs)
    rows.append(("", "jobs/quickstart.toml --workers 0: from outside", f"{one_step * 1e6:,.0f} us/step",
                 f"inside: median {one_inside.median * 1e6:,.0f}, mean {one_inside.mean * 1e6:,.0f}, loop "
                 f"{one_inside.loop * 1e6:,.0f} us/step; outside / inside {one_step / one_inside.median:.2f}x "
                 "(one process, no Ray)"))
    # a bare 2-worker lockstep step in plain processes, alone and beside an idle Ray: what this machine allows
    rows.extend(runahead.peer_rows(p["peer_steps"], p["peer_rounds"]))
    epoch = per_step * (60000 // 32)
    rows.append(("", "one minibatch epoch of 60,000, end to end", f"{epoch:.2f} s",
                 f"{seed_epoch_s / epoch:,.0f}x faster than the seed's loop (target: >= 500x)"))
    kernel_rows(data_dir, p, rows, seed_epoch_s, tmp, runs)
    short, long_ = p["cli_epochs"]
    epochs, inside = {1: [], 2: []}, {1: [], 2: []}
    for _ in range(p["cli_rounds"]):  # interleaved: 1 worker, 2 workers, 1, 2, ...
        for workers in (1, 2):
            gd = ["--data", str(data_dir), "--optimizer", "gd", "--workers", str(workers), "--lr", "0.05",
                  "--set", "cluster.cpus_per_worker=0.5"]
            a, _ = cli_run([*gd, "--steps", str(short)], tmp / str(next(runs)))
            b, seen = cli_run([*gd, "--steps", str(long_)], tmp / str(next(runs)))
            epochs[workers].append((b - a) / (long_ - short))
            inside[workers].append(seen.median)
    ratios = sorted(one / two for one, two in zip(epochs[1], epochs[2]))
    inside_ratios = sorted(one / two for one, two in zip(inside[1], inside[2]))
    for workers, values in epochs.items():
        rows.append(("end to end (CLI, gd epoch)", f"{workers} worker(s), from outside", f"{statistics.median(values):.3f} s/epoch",
                     f"{short} and {long_} epochs; rounds {', '.join(f'{v:.3f}' for v in values)}; inside: median "
                     f"step_s {statistics.median(inside[workers]):.3f} s"))
    rows.append(("", "speed-up 2 workers vs 1, end to end", f"{statistics.median(ratios):.2f}x",
                 f"median of {len(ratios)} interleaved rounds, spread {ratios[0]:.2f}-{ratios[-1]:.2f}x (target: >= 1.8x); "
                 f"inside: {statistics.median(inside_ratios):.2f}x ({inside_ratios[0]:.2f}-{inside_ratios[-1]:.2f}x)"))
    # the same arithmetic in plain processes, alone and beside an idle Ray: what this machine allows
    rows.extend(plain_gd.rows(data_dir, p["n_train"], p["plain_epochs"], p["plain_rounds"]))
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def kernel_rows(data_dir, p, rows, seed_epoch_s, tmp, runs):
    """The CLI's minibatch step by model.kernel: single process and the mesh of 2 workers, with
    the seed ratio of the epoch they make; numba's rows "skipped" where it is not installed."""
    kernels = ["numpy"] + (["numba"] if importlib.util.find_spec("numba") is not None else [])
    for kernel in kernels:
        for workers in p["kernel_workers"]:
            if (kernel, workers) == ("numpy", 2):
                continue  # the rows above
            per_step, inside = cli_minibatch_step(data_dir, p, tmp, runs, workers, kernel)
            epoch = per_step * (60000 // 32)
            where = "single process" if workers == 0 else "mesh, 2 workers"
            rows.append((f"end to end (CLI, minibatch 32), kernel {kernel}", where, f"{per_step * 1e6:,.0f} us/step",
                         f"inside: median {inside.median * 1e6:,.0f}, mean {inside.mean * 1e6:,.0f}, loop "
                         f"{inside.loop * 1e6:,.0f} us/step ({per_step / inside.median:.2f}x); epoch {epoch:.2f} s, "
                         f"{seed_epoch_s / epoch:,.0f}x faster than the seed's loop (target: >= 500x)"))
    if len(kernels) == 1:
        rows.append(("end to end (CLI, minibatch 32), kernel numba", "numba", "skipped",
                     "numba not installed (optional extra 'fast')"))


def print_table(rows, header):
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    line = " | ".join("{:<%d}" % w for w in widths)
    print(line.format(*header))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(line.format(*r))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data and few steps (smoke test)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="only the CLI runs from outside (and the seed's loop they are compared with)")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    import ray
    with tempfile.TemporaryDirectory(prefix="distmlp-bench-") as tmp:
        source = synthetic_mnist(Path(tmp), p["n_train"], p["n_test"])
        rows = []
        if args.end_to_end:
            seed_epoch_s = seed_loop(source, p, rows, None, None)
        else:
            connect.connect(num_cpus=2)
            try:
                fast_s, local_s = minibatch_steps(source, p, rows)
                gd_epochs(source, p, rows)
                seed_epoch_s = seed_loop(source, p, rows, fast_s, local_s)
            finally:
                ray.shutdown()
        end_to_end(Path(tmp), p, rows, seed_epoch_s)
    report("distmlp benchmarks", "quick" if args.quick else "full", load_start, rows)


def report(title, mode, load_start, rows):
    """The header line (date, machine, load average at start and now) and the table of rows."""
    print(f"\n{title} | {time.strftime('%Y-%m-%d %H:%M')} | {platform.node()} | {platform.processor() or platform.machine()}"
          f" | {os.cpu_count()} cores | Python {sys.version.split()[0]} | {mode}"
          f" | load average {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print_table(rows, ("comparison", "candidate", "median", "notes"))


if __name__ == "__main__":
    main()
