"""Per-record cost of a CLI run's output hooks, without training: synthetic step records fed
through MetricsWriter, Progress (plain lines, and the bar on a terminal) and TensorBoardHook.

    python -m benchmarks.hooks                   # 20,000 records
    python -m benchmarks.hooks --records 100000

Prints CPU microseconds of this process (all its threads) per record: in on_step, and in all (on_step and on_end, where the buffered
hooks write what is left).
"""

import argparse
import io
import tempfile
import time

from rich.console import Console

from distmlp import config, metrics, progress, trainer, tracking

STEPS_PER_EPOCH = 250
EVAL_EVERY = 500


def records(n):
    """n step records shaped like a minibatch run's (batch 32, evaluated every EVAL_EVERY steps)."""
    out = []
    for step in range(1, n + 1):
        record = {"step": step, "epoch": step / STEPS_PER_EPOCH, "samples_seen": 32 * step,
                  "train_loss": 2.3 / (1 + step / 1000), "lr": 0.1, "step_s": 7e-4, "compute_s": 4e-4,
                  "comm_s": 3e-4}
        if step % EVAL_EVERY == 0:
            record.update(test_loss=0.3, test_accuracy=0.9)
        out.append(record)
    return out


def measure(make_hooks, recs):
    """(us per record in on_step, us per record in all) of the hooks make_hooks(run_dir) returns."""
    with tempfile.TemporaryDirectory() as run_dir:
        hooks = make_hooks(run_dir)
        state = trainer.TrainState(params={}, opt_state={})
        info = {"steps": len(recs), "steps_per_epoch": STEPS_PER_EPOCH, "workers": 2, "n_train": 8000, "n_test": 2000}
        for hook in hooks:
            hook.on_start(state, info)
        t0 = time.process_time()
        for record in recs:
            state.step, state.samples_seen = record["step"], record["samples_seen"]
            for hook in hooks:
                hook.on_step(state, record)
        t1 = time.process_time()
        for hook in hooks:
            hook.on_end(state, recs[-1])
        t2 = time.process_time()
    return 1e6 * (t1 - t0) / len(recs), 1e6 * (t2 - t0) / len(recs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    recs = records(args.records)
    job = config.load_job(overrides=[f"run.steps={args.records}"])

    def lines(run_dir):
        return progress.Progress(echo=lambda line: None, bar=False)

    def bar(run_dir):
        return progress.Progress(echo=lambda line: None, bar=Console(file=io.StringIO(), force_terminal=True))

    cases = {
        "MetricsWriter": lambda d: [metrics.MetricsWriter(d)],
        "Progress, lines": lambda d: [lines(d)],
        "Progress, bar on a terminal": lambda d: [bar(d)],
        "TensorBoardHook": lambda d: [tracking.TensorBoardHook(d, job)],
        "all (lines)": lambda d: [lines(d), metrics.MetricsWriter(d), tracking.TensorBoardHook(d, job)],
        "all (bar)": lambda d: [bar(d), metrics.MetricsWriter(d), tracking.TensorBoardHook(d, job)],
    }
    print(f"{args.records:,} records")
    for name, make in cases.items():
        on_step, total = measure(make, recs)
        print(f"{name:30s} {on_step:7.1f} us/record in on_step, {total:7.1f} in all")


if __name__ == "__main__":
    main()
