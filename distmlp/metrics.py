"""Step records out of the training loop: the metrics files, the hooks a run uses, the plot.

Loop hooks (trainer.train) get on_start(state, info), on_steps(state, steps) after every round
of steps (trainer.Steps: the records as columns; Hook's default calls on_step(state, record) for
each) and on_end(state, record). Records are flat dicts: step, epoch, samples_seen, train_loss,
lr, step_s, compute_s, comm_s, plus test_loss and test_accuracy on evaluated steps;
MetricsWriter adds wall_s (seconds since the run started). The hooks here buffer what they write
and write it in batches (BufferedHook).

In a run directory on an object store (distmlp.storage), which cannot append, the JSON lines go
to numbered objects metrics/part-000000.jsonl, part-000001.jsonl, ... one per write.
"""

import io
import json
import math
import os
import re
import time

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from distmlp import arrow, fsutil, storage
from distmlp.errors import UserError
from distmlp.trainer import Hook, Steps

JSONL = "metrics.jsonl"
EVENT = "event"  # the key that marks a metrics.jsonl record that is not a step (e.g. "membership")
PARQUET = "metrics.parquet"
PARTS = "metrics"  # on an object store: the directory of the JSON-line parts
PART = re.compile(r"part-\d{6}\.jsonl")

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
INTEGER_FIELDS = {f.name for f in SCHEMA if pa.types.is_integer(f.type)}
# one record a line; NaN and infinities become null; NumPy scalars are numbers
JSON_OPTIONS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY


class MetricsError(UserError):
    """A run directory without readable metrics, or a plot that cannot be drawn."""


def to_table(records):
    """Records (dicts) -> a pyarrow Table with SCHEMA; missing keys and non-finite numbers become
    nulls."""
    arrays = []
    for name in SCHEMA.names:
        values = [r.get(name) for r in records]
        if name in INTEGER_FIELDS:
            arrays.append(arrow.array(np.array([0 if v is None else v for v in values], np.int64),
                                      np.array([v is not None for v in values], bool)))
        else:
            arrays.append(_floats(np.array([math.nan if v is None else v for v in values], np.float64)))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _floats(values):
    """The Arrow array of a float64 column, null where a number is not finite (as JSON has it)."""
    return arrow.array(values, np.isfinite(values))


# Step records are floats that seldom repeat: a dictionary per column made the file larger and
# took most of the write (pyarrow tries one for every column unless told not to).
PARQUET_OPTIONS = {"use_dictionary": False}


def write_parquet_atomic(table, path):
    """Write table (step records) to path as Parquet, atomically."""
    fsutil.atomic_write(path, lambda tmp: pq.write_table(table, tmp, **PARQUET_OPTIONS))


def _check_record(path, lineno, record):
    """Raise MetricsError unless record is an object with an integer step and SCHEMA's other
    fields numbers of their type or null (absent)."""
    if not isinstance(record, dict) or not _is_int(record.get("step")):
        raise MetricsError(f"{path}: line {lineno}: not a step record (an object with an integer \"step\")")
    for name in SCHEMA.names:
        value = record.get(name)
        ok = value is None or (_is_int(value) and -2**63 <= value < 2**63) or (
            name not in INTEGER_FIELDS and isinstance(value, float))
        if not ok:
            raise MetricsError(f"{path}: line {lineno}: {name} is {value!r}, not a number")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def read_jsonl(path):
    """The records in a metrics.jsonl; a torn last line (a crash mid-write) is dropped, any other
    line that is not a step record raises MetricsError naming the file and line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        return _parse_lines(path, f.read())


def _parse_lines(path, text):
    lines = text.splitlines()
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError, or a number too large to convert
            if lineno == len(lines):
                break
            raise MetricsError(f"{path}: line {lineno}: not JSON") from None
        _check_record(path, lineno, record)
        records.append(record)
    return records


def read_parts(run_dir):
    """The records of a run directory on an object store, from its parts in order. A step record
    at or before an earlier step (a resumed run going on from its checkpoint) drops the records
    from that step on, as resuming a local run does."""
    parts_dir = storage.join(run_dir, PARTS)
    records, last_step = [], None
    for rel in sorted(rel for rel, _ in storage.listing(parts_dir) if PART.fullmatch(rel)):
        path = storage.join(parts_dir, rel)
        for record in _parse_lines(path, storage.read_bytes(path).decode("utf-8", errors="replace")):
            if EVENT not in record:
                if last_step is not None and record["step"] <= last_step:
                    records = [r for r in records if r["step"] < record["step"]]
                last_step = record["step"]
            records.append(record)
    return records


def _records(run_dir):
    """Every record of a run directory (steps and events), [] when it has none."""
    if storage.is_remote(run_dir):
        return read_parts(run_dir)
    jsonl = os.path.join(run_dir, JSONL)
    return read_jsonl(jsonl) if os.path.exists(jsonl) else []


def _parquet_bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **PARQUET_OPTIONS)
    return sink.getvalue().to_pybytes()


class BufferedHook(Hook):
    """A loop hook that collects rows and writes them in batches: once flush_s seconds have passed
    since the last write, after a round of steps that must_flush(steps) names, and at the end.

    Subclasses implement rows(steps) (a list: what to keep of a round's trainer.Steps) and
    write(rows).
    """

    flush_s = 0.5  # at most this long between writes while steps arrive

    def __init__(self):
        self._rows = []
        self._last_write = time.perf_counter()

    def on_steps(self, state, steps):
        self._rows += self.rows(steps)
        now = time.perf_counter()
        if now - self._last_write >= self.flush_s or self.must_flush(steps):
            self.flush(now)

    def on_step(self, state, record):
        self.on_steps(state, Steps.from_records([record]))

    def on_end(self, state, record):
        self.flush()
        self.close()

    def flush(self, now=None):
        """Write the buffered rows now."""
        if self._rows:
            rows, self._rows = self._rows, []
            self.write(rows)
        self._last_write = time.perf_counter() if now is None else now

    def must_flush(self, steps):
        return False

    def close(self):
        pass


class MetricsWriter(BufferedHook):
    """Every step record as one JSON line in RUN_DIR/metrics.jsonl, and RUN_DIR/metrics.parquet.

    The JSON lines are buffered and appended at least every flush_s seconds (so `tail -f` follows
    a run), after every round with an evaluated step or a checkpoint step (every
    checkpoint_every steps), so that a killed run (or a stopped sweep trial) leaves every record
    up to its last checkpoint and its last evaluation on disk. The rows of metrics.parquet are
    kept as Arrow columns while the run goes (made from the rounds' columns, no record parsed
    again) and written once, at the end. Resuming in the same run directory keeps the records up
    to the resumed step and drops any later ones.

    On an object store each write is a new part (see read_parts), at least remote_flush_s apart
    while steps arrive; a resumed run removes metrics.parquet until its end writes it again, from
    the parts.
    """

    remote_flush_s = 10.0  # on an object store: at most this long between parts while steps arrive

    def __init__(self, run_dir, checkpoint_every=0):
        super().__init__()
        self.run_dir = run_dir
        self.checkpoint_every = checkpoint_every
        self.remote = storage.is_remote(run_dir)
        if self.remote:
            self.flush_s = self.remote_flush_s
        self.jsonl_path = os.path.join(run_dir, JSONL)  # local only
        self.parquet_path = str(storage.join(run_dir, PARQUET))
        self._file = None
        self._part = 0  # on an object store: the number of the next part
        self._t0 = None
        self._tables = []  # local: metrics.parquet's rows so far, as Arrow tables

    def on_start(self, state, info):
        if self.remote:
            return self._start_parts(state)
        os.makedirs(self.run_dir, exist_ok=True)
        old = read_jsonl(self.jsonl_path) if os.path.exists(self.jsonl_path) else []
        kept = [r if EVENT in r else {k: r[k] for k in SCHEMA.names if k in r} for r in old if r["step"] <= state.step]
        steps = [r for r in kept if EVENT not in r]
        offset = (steps[-1].get("wall_s") or 0.0) if steps else 0.0
        self._t0 = time.perf_counter() - offset
        self._tables = [to_table(steps)]
        fsutil.atomic_write(self.jsonl_path, lambda tmp: self._write_lines(tmp, kept))
        self._file = open(self.jsonl_path, "ab")

    def _start_parts(self, state):
        steps = [r for r in read_parts(self.run_dir) if EVENT not in r and r["step"] <= state.step]
        self._t0 = time.perf_counter() - ((steps[-1].get("wall_s") or 0.0) if steps else 0.0)
        parts = [rel for rel, _ in storage.listing(storage.join(self.run_dir, PARTS)) if PART.fullmatch(rel)]
        self._part = 1 + max((int(rel[5:11]) for rel in parts), default=-1)
        storage.remove_file(self.parquet_path)

    def rows(self, steps):
        wall_s = time.perf_counter() - self._t0  # when the loop handled the round, for all its steps
        if not self.remote:
            self._tables.append(steps_table(steps, wall_s))
        return [json_lines(steps.records(), wall_s)]

    def must_flush(self, steps):
        return bool(steps.tests) or (self.checkpoint_every > 0
                                     and bool((steps.columns["step"] % self.checkpoint_every == 0).any()))

    def event(self, record):
        """Write a record that is not a step (record[EVENT] names it, e.g. "membership") now."""
        self._rows.append(orjson.dumps({**record, "wall_s": time.perf_counter() - self._t0}, option=JSON_OPTIONS))
        self.flush()

    def write(self, chunks):
        lines = b"".join(chunks)
        if self.remote:
            storage.write_bytes(storage.join(self.run_dir, PARTS, f"part-{self._part:06d}.jsonl"), lines)
            self._part += 1
            return
        self._file.write(lines)
        self._file.flush()

    def on_end(self, state, record):
        super().on_end(state, record)
        if self.remote:
            steps = to_table([r for r in read_parts(self.run_dir) if EVENT not in r])
            return storage.write_bytes(self.parquet_path, _parquet_bytes(steps))
        write_parquet_atomic(pa.concat_tables(self._tables).combine_chunks(), self.parquet_path)
        self._tables = []

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    @staticmethod
    def _write_lines(path, records):
        with open(path, "wb") as f:
            f.writelines(orjson.dumps(r, option=JSON_OPTIONS) for r in records)


def json_lines(records, wall_s):
    """The JSON lines of step records (flat dicts of numbers), each with wall_s added last."""
    if not records:
        return b""
    end = b',"wall_s":' + orjson.dumps(wall_s) + b"}\n"
    # one dump of the list, then "},{" between two records (a flat dict of numbers has no other) becomes a line end
    body = orjson.dumps(records, option=orjson.OPT_SERIALIZE_NUMPY)[1:-2]
    return body.replace(b"},{", end + b"{") + end


def steps_table(steps, wall_s):
    """The rows of metrics.parquet (SCHEMA) for steps (trainer.Steps), with their wall_s; a
    non-finite number is null, as in the JSON lines."""
    n = len(steps)
    columns = {**steps.columns, "test_loss": np.full(n, math.nan), "test_accuracy": np.full(n, math.nan),
               "wall_s": np.full(n, wall_s)}
    for i, (loss, accuracy) in steps.tests.items():
        columns["test_loss"][i], columns["test_accuracy"][i] = loss, accuracy
    return pa.Table.from_arrays([arrow.array(columns[name].astype(np.int64)) if name in INTEGER_FIELDS
                                 else _floats(columns[name].astype(np.float64)) for name in SCHEMA.names],
                                schema=SCHEMA)


def load(run_dir):
    """The step records of a run directory as a pyarrow Table (Parquet, else the JSON lines)."""
    if storage.is_remote(run_dir):
        return _load_remote(run_dir)
    parquet, jsonl = os.path.join(run_dir, PARQUET), os.path.join(run_dir, JSONL)
    if os.path.exists(jsonl) and (not os.path.exists(parquet)
                                  or os.path.getmtime(jsonl) > os.path.getmtime(parquet)):
        return to_table([r for r in read_jsonl(jsonl) if EVENT not in r])
    if os.path.exists(parquet):
        try:
            return pq.read_table(parquet, schema=SCHEMA, use_threads=False)
        except (pa.ArrowException, OSError) as e:
            raise MetricsError(f"{parquet}: not a readable metrics file: {str(e).splitlines()[0]}") from None
    if not os.path.isdir(run_dir):
        raise MetricsError(f"{run_dir}: no such run directory")
    raise MetricsError(f"{run_dir}: no {PARQUET} or {JSONL} in this run directory")


def _load_remote(run_dir):
    """load() on an object store: metrics.parquet when the run ended (a resumed run removes it
    until it ends), else the parts."""
    parquet = storage.join(run_dir, PARQUET)
    try:
        return pq.read_table(io.BytesIO(storage.read_bytes(parquet)), schema=SCHEMA, use_threads=False)
    except FileNotFoundError:
        pass
    except (pa.ArrowException, OSError) as e:
        raise MetricsError(f"{parquet}: not a readable metrics file: {str(e).splitlines()[0]}") from None
    records = read_parts(run_dir)
    if records:
        return to_table([r for r in records if EVENT not in r])
    if not storage.is_dir(run_dir):
        raise MetricsError(f"{run_dir}: no such run directory")
    raise MetricsError(f"{run_dir}: no {PARQUET} or {PARTS}/ parts in this run directory")


def events(run_dir, kind="membership"):
    """The records of metrics.jsonl that are not steps but events of one kind (worker count changes)."""
    return [r for r in _records(run_dir) if r.get(EVENT) == kind]


def smooth(values, fraction=0.02):
    """Centered moving average of values over a window of about `fraction` of them (odd, >= 1);
    near the ends the window shrinks to what exists. Non-finite values are left out."""
    n = len(values)
    half = max(int(n * fraction) // 2, 0)
    finite = [v if v is not None and math.isfinite(v) else None for v in values]
    sums, counts = [0.0], [0]  # prefix sums of the finite values and of how many there are
    for v in finite:
        sums.append(sums[-1] + (v or 0.0))
        counts.append(counts[-1] + (v is not None))
    out = []
    for i in range(n):
        lo, hi = max(i - half, 0), min(i + half + 1, n)
        count = counts[hi] - counts[lo]
        out.append((sums[hi] - sums[lo]) / count if count else math.nan)
    return out


def figure(run_dir):
    """The matplotlib Figure of a run: loss (per batch, its moving average, held-out) and held-out
    accuracy against step."""
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
    ax_loss.plot(cols["step"], cols["train_loss"], lw=0.6, alpha=0.35, color="C0", label="train (batch)")
    ax_loss.plot(cols["step"], smooth(cols["train_loss"]), lw=1.6, color="C0", label="train (moving average)")
    ax_loss.plot(eval_steps, [cols["test_loss"][i] for i in evaluated], "o-", ms=3, color="C1", label="held-out")
    ax_loss.set(xlabel="step", ylabel="cross-entropy loss", title="loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_acc.plot(eval_steps, [100 * cols["test_accuracy"][i] for i in evaluated], "o-", ms=3, color="C2")
    ax_acc.set(xlabel="step", ylabel="accuracy (%)", title="held-out accuracy")
    ax_acc.grid(alpha=0.3)
    for change in events(run_dir):  # elastic training: where the worker count changed
        for ax in (ax_loss, ax_acc):
            ax.axvline(change["step"], color="0.4", ls="--", lw=0.8)
        ax_acc.annotate(f"{change['workers_before']}->{change['workers_after']} workers", (change["step"], 0.02),
                        xycoords=("data", "axes fraction"), rotation=90, fontsize=7, color="0.3")
    fig.suptitle(storage.name(run_dir) if storage.is_remote(run_dir) else os.path.basename(os.path.normpath(run_dir)))
    return fig


def plot(run_dir, out_png):
    """figure(run_dir) saved as a PNG at out_png; returns out_png."""
    fig = figure(run_dir)
    import matplotlib.pyplot as plt
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        fsutil.atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return out_png
