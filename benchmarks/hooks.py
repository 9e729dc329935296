"""Per-record cost of a CLI run's output hooks, without training: synthetic rounds of step
records handed over as the training loop does (trainer.round_steps, trainer.hand_over) to
MetricsWriter, Progress (plain lines, and the bar on a terminal) and TensorBoardHook.

    python -m benchmarks.hooks                   # 20,000 records
    python -m benchmarks.hooks --records 100000

Prints CPU microseconds of this process (all its threads) per record: in the rounds (making
their columns and the hooks' on_steps), and in all (with on_end, where the buffered hooks write
what is left and metrics.parquet is written). "no hooks" is the loop's own part.
"""

import argparse
import io
import tempfile
import time

from rich.console import Console

from distmlp import config, metrics, progress, trainer, tracking

STEPS_PER_EPOCH = 250
EVAL_EVERY = 500
ROUND = 3700  # steps in a round: about trainer.ROUND_S of the quickstart's steps


def rounds(n):
    """(first step, [StepRecord], evaluations) of n steps shaped like a minibatch run's (batch 32,
    evaluated every EVAL_EVERY steps), in rounds of ROUND steps."""
    out = []
    for first in range(0, n, ROUND):
        steps = range(first + 1, min(first + ROUND, n) + 1)
        records = [trainer.StepRecord(2.3 * 32 / (1 + step / 1000), 32, 4e-4, 7e-4) for step in steps]
        out.append((first, records, {step: (900, 300.0, 1000) for step in steps if step % EVAL_EVERY == 0 or step == n}))
    return out


def measure(make_hooks, job, plan, parts):
    """(us per record in the rounds, us per record in all) of the hooks make_hooks(run_dir) returns."""
    n = plan.steps
    with tempfile.TemporaryDirectory() as run_dir:
        hooks = make_hooks(run_dir)
        state = trainer.TrainState(params={}, opt_state={})
        info = {"steps": n, "steps_per_epoch": STEPS_PER_EPOCH, "workers": 2, "n_train": 8000, "n_test": 2000}
        for hook in hooks:
            hook.on_start(state, info)
        t0 = time.process_time()
        for first, records, evals in parts:
            trainer.hand_over(state, trainer.round_steps(job, plan, state, records, evals), hooks)
        t1 = time.process_time()
        for hook in hooks:
            hook.on_end(state, state.metrics)
        t2 = time.process_time()
    return 1e6 * (t1 - t0) / n, 1e6 * (t2 - t0) / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    job = config.load_job(overrides=[f"run.steps={args.records}", "optimizer.batch_size=32"])
    plan = trainer.Plan(trainer.make_sampler(job, STEPS_PER_EPOCH * 32), 0.1, 0.0, EVAL_EVERY, args.records)
    parts = rounds(args.records)

    def lines(run_dir):
        return progress.Progress(echo=lambda line: None, bar=False)

    def bar(run_dir):
        return progress.Progress(echo=lambda line: None, bar=Console(file=io.StringIO(), force_terminal=True))

    cases = {
        "no hooks": lambda d: [],
        "MetricsWriter": lambda d: [metrics.MetricsWriter(d)],
        "Progress, lines": lambda d: [lines(d)],
        "Progress, bar on a terminal": lambda d: [bar(d)],
        "TensorBoardHook": lambda d: [tracking.TensorBoardHook(d, job)],
        "all (lines)": lambda d: [lines(d), metrics.MetricsWriter(d), tracking.TensorBoardHook(d, job)],
        "all (bar)": lambda d: [bar(d), metrics.MetricsWriter(d), tracking.TensorBoardHook(d, job)],
    }
    print(f"{args.records:,} records")
    for name, make in cases.items():
        rounds_us, total = measure(make, job, plan, parts)
        print(f"{name:30s} {rounds_us:7.1f} us/record in the rounds, {total:7.1f} in all")


if __name__ == "__main__":
    main()
