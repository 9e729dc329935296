"""Step records out of the training loop: the metrics files, the progress line, the plot.

Both MetricsWriter and Progress are loop hooks (trainer.train calls on_start(state, info),
on_step(state, record) after every step, on_end(state, record)). Records are flat dicts:
step, epoch, samples_seen, train_loss, lr, step_s, compute_s, comm_s, plus test_loss and
test_accuracy on evaluated steps; MetricsWriter adds wall_s (seconds since the run started).
"""

import json
import math
import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from distmlp import fsutil
from distmlp.trainer import Hook
from distmlp.errors import UserError

JSONL = "metrics.jsonl"
PARQUET = "metrics.parquet"

# One row per step; held-out columns are null where the step was not evaluated.
SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("epoch", pa.float64()),
    ("samples_seen", pa.int64()),
    ("train_loss", pa.float64()),
    ("test_loss", pa.float64()),
    ("test_accuracy", pa.float64()),
    ("lr", pa.float64()),
    ("wall_s", pa.float64()),
    ("step_s", pa.float64()),
    ("compute_s", pa.float64()),
    ("comm_s", pa.float64()),
])


class MetricsError(UserError):
    """A run directory without readable metrics, or a plot that cannot be drawn."""


def to_table(records):
    """Records (dicts) -> a pyarrow Table with SCHEMA; missing keys become nulls."""
    return pa.table({f.name: pa.array([r.get(f.name) for r in records], f.type) for f in SCHEMA},
                    schema=SCHEMA)


def write_parquet_atomic(table, path):
    """Write table to path as Parquet, atomically."""
    fsutil.atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_jsonl(path):
    """The records in a metrics.jsonl; a torn last line (a crash mid-write) is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def _json_value(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


class MetricsWriter(Hook):
    """Every step record as one JSON line in RUN_DIR/metrics.jsonl, and RUN_DIR/metrics.parquet.

    The JSON lines are appended and flushed per step (for tail -f); the Parquet file is
    rewritten atomically every parquet_every steps and at the end. Resuming in the same run
    directory keeps the records up to the resumed step and drops any later ones.
    """

    def __init__(self, run_dir, parquet_every=200):
        self.run_dir = run_dir
        self.parquet_every = parquet_every
        self.jsonl_path = os.path.join(run_dir, JSONL)
        self.parquet_path = os.path.join(run_dir, PARQUET)
        self.records = []
        self._file = None
        self._t0 = None

    def on_start(self, state, info):
        os.makedirs(self.run_dir, exist_ok=True)
        old = read_jsonl(self.jsonl_path) if os.path.exists(self.jsonl_path) else []
        self.records = [r for r in old if r["step"] <= state.step]
        offset = self.records[-1]["wall_s"] if self.records else 0.0
        self._t0 = time.perf_counter() - offset
        self._rewrite_jsonl()
        self._file = open(self.jsonl_path, "a", encoding="utf-8")

    def on_step(self, state, record):
        row = {**record, "wall_s": time.perf_counter() - self._t0}
        self.records.append(row)
        self._file.write(json.dumps({k: _json_value(v) for k, v in row.items()}) + "\n")
        self._file.flush()
        if self.parquet_every and len(self.records) % self.parquet_every == 0:
            write_parquet_atomic(to_table(self.records), self.parquet_path)

    def on_end(self, state, record):
        write_parquet_atomic(to_table(self.records), self.parquet_path)
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def _rewrite_jsonl(self):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.records)
        fsutil.atomic_write(self.jsonl_path, write)


def format_line(record, steps, ms_per_step):
    """`step 120/1875 | epoch 0.51 | loss 0.3121 | acc 91.2% | 0.41 ms/step` (acc when evaluated)."""
    parts = [f"step {record['step']}/{steps}", f"epoch {record['epoch']:.2f}",
             f"loss {record['train_loss']:.4f}"]
    if record.get("test_accuracy") is not None:
        parts.append(f"acc {100 * record['test_accuracy']:.1f}%")
    parts.append(f"{ms_per_step:.2f} ms/step")
    return " | ".join(parts)


def default_log_every(steps, lines=20):
    """About `lines` progress lines over a run of `steps` steps."""
    return max(1, math.ceil(steps / lines))


class Progress(Hook):
    """One line per logged step (every log_every-th, every evaluated one, the last one), plus a
    rich progress bar with ETA when stdout is a terminal and quiet is False.

    log_every=0 means about 20 lines a run. The CLI passes quiet=True and an echo to stderr
    with --json, so stdout keeps only the final JSON line.
    """

    def __init__(self, log_every=0, quiet=False, echo=print, bar=None):
        self.log_every = log_every
        self.echo = echo
        self.show_bar = (not quiet and sys.stdout.isatty()) if bar is None else bar
        self._bar = None
        self._task = None

    def on_start(self, state, info):
        self.steps = info["steps"]
        self.every = self.log_every or default_log_every(self.steps)
        self._since = 0.0  # step seconds since the last line
        self._count = 0  # steps since the last line
        self._last_logged = state.step
        if self.show_bar:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar,
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)
            self._bar = Bar(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                            transient=True)
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.steps, completed=state.step)

    def on_step(self, state, record):
        self._since += record["step_s"]
        self._count += 1
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"])
        step = record["step"]
        if step % self.every == 0 or record.get("test_accuracy") is not None or step == self.steps:
            self._line(record)

    def on_end(self, state, record):
        if record and record.get("step", 0) > self._last_logged:
            self._line(record)
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _line(self, record):
        line = format_line(record, self.steps, 1000 * self._since / max(self._count, 1))
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            self.echo(line)
        self._since, self._count = 0.0, 0
        self._last_logged = record["step"]


def load(run_dir):
    """The step records of a run directory as a pyarrow Table (Parquet, else the JSON lines)."""
    parquet, jsonl = os.path.join(run_dir, PARQUET), os.path.join(run_dir, JSONL)
    if os.path.exists(jsonl) and (not os.path.exists(parquet)
                                  or os.path.getmtime(jsonl) > os.path.getmtime(parquet)):
        return to_table(read_jsonl(jsonl))
    if os.path.exists(parquet):
        return pq.read_table(parquet, schema=SCHEMA, use_threads=False)
    if not os.path.isdir(run_dir):
        raise MetricsError(f"{run_dir}: no such run directory")
    raise MetricsError(f"{run_dir}: no {PARQUET} or {JSONL} in this run directory")


def plot(run_dir, out_png):
    """Loss (train, held-out) and held-out accuracy against step, saved as a PNG at out_png."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MetricsError("plotting needs matplotlib: pip install 'distmlp[plot]'") from None
    cols = load(run_dir).to_pydict()
    if not cols["step"]:
        raise MetricsError(f"{run_dir}: the metrics file has no steps yet")
    evaluated = [i for i, a in enumerate(cols["test_accuracy"]) if a is not None]
    eval_steps = [cols["step"][i] for i in evaluated]

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    ax_loss.plot(cols["step"], cols["train_loss"], lw=0.8, alpha=0.7, label="train (batch)")
    ax_loss.plot(eval_steps, [cols["test_loss"][i] for i in evaluated], "o-", ms=3, label="held-out")
    ax_loss.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(eval_steps, [100 * cols["test_accuracy"][i] for i in evaluated], "o-", ms=3, color="C2")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="held-out accuracy")
    ax_acc.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))

    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    try:
        fsutil.atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out_png
