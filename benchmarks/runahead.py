"""Does sharing a minibatch step's rows shorten the 2-worker tail? Lockstep against run-ahead.

Two plain processes (no Ray, no driver), each pinned to a core where there are two, step the
same minibatch run: the NumPy kernel's gradient sums of 16 of a step's 32 rows each, the sums in
a ring of RING shared-memory slots, added in rank order and applied as an SGD update.

- lockstep (the mesh's way): each worker computes its own half, then waits for its peer's.
- run-ahead: each half is claimed under an fcntl lock; a worker done with its own half takes
  its peer's if the peer has not claimed it yet, and a worker that fell behind catches up by
  applying the sums already in the ring.

Both must end with the same bits in both workers, and the same as each other. Printed per
round: wall time per step, the median and mean interval between steps, how many halves each
worker took from its peer. docs/performance.md (twelfth session) has what it showed.

The lockstep pair is also the peer of the end-to-end target (peer_rows, in benchmarks.run):
its wall time per step over its median step, alone and beside an idle embedded Ray, is the
ratio a 2-worker step reaches on this machine with nothing but the step's arithmetic and its
wait for the peer (no Ray in the workers, no sampler, no driver, no hooks, no evaluations).

    python -m benchmarks.runahead [--steps 20000] [--rounds 3]
    python -m benchmarks.runahead --peer [--steps 20000] [--rounds 5]   # the peer rows
"""

import argparse
import fcntl
import mmap
import multiprocessing
import os
import platform
import statistics
import tempfile
import time

import numpy as np

RING = 64
SIZES = [784, 16, 16, 10]
ROWS, BATCH, LR = 8000, 32, 0.1


def worker(rank, mode, steps, path, queue, start_at):
    """Step `steps` times as rank (0 or 1) by mode; put (rank, seconds, step ends, weights' bytes,
    halves taken from the peer) on queue."""
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # before this process's first BLAS call
    from distmlp import kernels, mlp, step as contract
    if len(os.sched_getaffinity(0)) >= 2:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[rank]})
    fd = os.open(path, os.O_RDWR)
    memory = mmap.mmap(fd, 0)
    params = mlp.init_params(SIZES, np.random.default_rng(1), np.float32)
    names = mlp.param_names(len(params) // 2)
    weights = contract.flatten(params, names)
    params = contract.unflatten(weights, params)  # views of the one flat array
    ints = np.frombuffer(memory, np.int64, 2 + 4 * RING)
    progress, claims, done = ints[:2], ints[2:2 + 2 * RING], ints[2 + 2 * RING:]
    slots = np.frombuffer(memory, np.float32, 2 * RING * weights.size, ints.nbytes).reshape(RING, 2, weights.size)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (ROWS, SIZES[0]), dtype=np.uint8)
    y = rng.integers(0, SIZES[-1], ROWS)
    batches = rng.integers(0, ROWS, (steps, BATCH))
    kernel = kernels.make("numpy", np.float32)
    total = np.empty_like(weights)
    ends, taken, peer = np.empty(steps), 0, 1 - rank

    def claim(t, half):
        if mode == "lockstep":
            return half == rank
        i = (t % RING) * 2 + half
        if claims[i] > t:
            return False
        fcntl.lockf(fd, fcntl.LOCK_EX, 8, 0)
        try:
            if claims[i] > t:
                return False
            claims[i] = t + 1
            return True
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN, 8, 0)

    while time.time() < start_at:  # both start together
        pass
    start = time.perf_counter()
    for t in range(steps):
        while progress[peer] < t - RING + 1:  # step t's slots are free once the peer applied t - RING
            pass
        for half in (rank, peer):
            if claim(t, half):
                grads, _, _ = kernel.keyed_grad_sums(params, x, y, batches[t, half * 16:(half + 1) * 16])
                kernel.flat_sums(grads, names, out=slots[t % RING, half])
                done[(t % RING) * 2 + half] = t + 1  # after the sums (x86 keeps stores in order)
                taken += half != rank
        while done[(t % RING) * 2] <= t or done[(t % RING) * 2 + 1] <= t:
            pass
        np.add(slots[t % RING, 0], slots[t % RING, 1], out=total)
        total *= np.float32(LR / BATCH)
        weights -= total
        progress[rank] = t + 1
        ends[t] = time.perf_counter()
    queue.put((rank, ends[-1] - start, np.diff(ends, prepend=start), weights.tobytes(), taken))


def run(mode, steps):
    """(us per step, median and mean us between steps, ranks agree, weights' bytes, [taken])."""
    n_weights = sum(n_out * (n_in + 1) for n_in, n_out in zip(SIZES, SIZES[1:]))  # weights and biases
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(dir=directory, prefix="distmlp-runahead-") as f:
        f.truncate(8 * (2 + 4 * RING) + 4 * 2 * RING * n_weights)
        f.flush()
        # spawned, not forked: the caller may have Ray's threads running (benchmarks.run)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        start_at = time.time() + 3.0  # both started and past their imports
        procs = [context.Process(target=worker, args=(rank, mode, steps, f.name, queue, start_at)) for rank in (0, 1)]
        for p in procs:
            p.start()
        results = sorted(queue.get() for _ in procs)
        for p in procs:
            p.join()
    intervals = np.maximum(results[0][2], results[1][2])[steps // 10:] * 1e6
    per_step = max(r[1] for r in results) / steps * 1e6
    return (per_step, float(np.median(intervals)), float(intervals.mean()), results[0][3] == results[1][3],
            results[0][3], [r[4] for r in results])


def peer_rows(steps, rounds):
    """Table rows: the lockstep pair's wall time per step over its median step (as the CLI's
    outside / inside), `rounds` runs alone and then `rounds` beside an idle embedded Ray."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return [("", "peer: 2 plain processes in lockstep", "skipped",
                 "its flags rely on x86's store order (no memory barrier in it)")]
    import ray

    from distmlp import connect

    def ratios():
        runs = [run("lockstep", steps) for _ in range(rounds)]
        return sorted(per_step / median for per_step, median, *_ in runs), statistics.median(r[1] for r in runs)

    alone = ratios()
    connect.connect(num_cpus=2)
    try:
        beside = ratios()
    finally:
        ray.shutdown()
    return [("", f"peer: 2 plain processes in lockstep, {where}", f"{statistics.median(r):.2f}x",
             f"wall per step / median step (the step's arithmetic and wait only); median of {rounds} rounds of "
             f"{steps} steps, spread {r[0]:.2f}-{r[-1]:.2f}x; median step {median:.0f} us")
            for where, (r, median) in (("alone", alone), ("beside an idle embedded Ray", beside))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=None, help="3 (5 with --peer)")
    parser.add_argument("--peer", action="store_true", help="only the lockstep peer rows of benchmarks.run")
    args = parser.parse_args(argv)
    if args.peer:
        for row in peer_rows(args.steps, args.rounds or 5):
            print(" | ".join(row[1:]))
        return
    args.rounds = args.rounds or 3
    bits = {}
    for _ in range(args.rounds):  # interleaved: the machine's phases move both alike
        for mode in ("lockstep", "run-ahead"):
            per_step, median, mean, agree, weights, taken = run(mode, args.steps)
            bits.setdefault(mode, weights)
            print(f"{mode:9s} | {per_step:6.1f} us/step | between steps: median {median:6.1f}, mean {mean:6.1f} us"
                  f" | ranks agree: {agree} | halves taken from the peer: {taken[0]}, {taken[1]}", flush=True)
    print("same bits, lockstep and run-ahead:", bits["lockstep"] == bits["run-ahead"])


if __name__ == "__main__":
    main()
