"""The peer of the gd scaling target: the workers' full-batch arithmetic in plain processes.

One process on every training row against two started together on half the rows each, both
by the NumPy kernel's full-batch gradient sums (what a worker computes in a gd step) with BLAS
on one thread, no Ray, no mesh, no driver: how far two processes can scale on this machine.
Then the same again beside an idle embedded Ray, whose own processes wake on both cores: the
ceiling a 2-worker run can reach here.

    python -m benchmarks.plain_gd DATA_DIR        # the rows, printed as a table
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the children import benchmarks from here


def child(data_dir, start, stop, epochs):
    """Print the median seconds of `epochs` full-batch gradient sums over rows [start, stop)."""
    import numpy as np

    from distmlp import data, kernels, mlp
    x, y = data.load_rows(data.from_directory(data_dir).train, start, stop)
    params = mlp.init_params([784, 16, 16, 10], np.random.default_rng(0), np.float32)
    kernel = kernels.make("numpy", np.float32)
    out = np.empty(sum(a.size for a in params.values()), np.float32)
    kernel.grad_sums(params, x, y, None, out)  # warm: buffers, pages
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        kernel.grad_sums(params, x, y, None, out)
        times.append(time.perf_counter() - t0)
    print(statistics.median(times))


def epoch_s(data_dir, n_train, processes, epochs):
    """Seconds of an epoch of n_train rows split over `processes` plain processes started
    together: the slowest one's median epoch (a synchronous step waits for it)."""
    from distmlp.worker import BLAS_ENV  # the workers' BLAS settings (here, not at the top: the children import no ray)
    bounds = [(n_train * i // processes, n_train * (i + 1) // processes) for i in range(processes)]
    # epochs * processes epochs of 1/processes of the rows each: every case runs about as long
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.plain_gd", "--child", str(data_dir), str(lo), str(hi),
                               str(epochs * processes)], stdout=subprocess.PIPE, text=True, env=os.environ | BLAS_ENV,
                              cwd=ROOT)
             for lo, hi in bounds]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a plain gd process failed")
    return max(float(out) for out in outs)


def scaling(data_dir, n_train, epochs, rounds):
    """(median, lowest, highest) of 1-process over 2-process epoch times, over `rounds` interleaved rounds."""
    ratios = sorted(epoch_s(data_dir, n_train, 1, epochs) / epoch_s(data_dir, n_train, 2, epochs) for _ in range(rounds))
    return statistics.median(ratios), ratios[0], ratios[-1]


def rows(data_dir, n_train, epochs, rounds):
    """Table rows: the scaling of two plain processes alone, and beside an idle embedded Ray."""
    import ray

    from distmlp import connect
    alone = scaling(data_dir, n_train, epochs, rounds)
    connect.connect(num_cpus=2)
    try:
        beside = scaling(data_dir, n_train, epochs, rounds)
    finally:
        ray.shutdown()
    return [("", f"peer: 2 plain processes vs 1, {where}", f"{median:.2f}x",
             f"the workers' gd arithmetic, no Ray in them; median of {rounds} rounds, spread {low:.2f}-{high:.2f}x")
            for where, (median, low, high) in (("alone", alone), ("beside an idle embedded Ray", beside))]


def main(argv):
    if argv[:1] == ["--child"]:
        data_dir, start, stop, epochs = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        return child(data_dir, start, stop, epochs)
    from distmlp import data
    data_dir = argv[0]
    n_train = data.from_directory(data_dir).train.count
    for row in rows(data_dir, n_train, 60, 5):  # as benchmarks.run does
        print(" | ".join(row[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
