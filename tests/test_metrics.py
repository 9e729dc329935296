"""MetricsWriter as a hook of the real training loop (LocalBackend, bundled sample), and hostile
metrics files."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from distmlp import checkpoint, config, data, driver, metrics, trainer


@pytest.fixture(scope="module")
def backend():
    return trainer.LocalBackend(data.resolve(dataset="mnist-sample"))


def small_job(steps=30, eval_every=10):
    return config.load_job(overrides=[f"run.steps={steps}", f"run.eval_every={eval_every}",
                                      "optimizer.lr=0.1"])


def test_writer_records_every_step_in_both_files(tmp_path, backend):
    run_dir = tmp_path / "run"
    state = trainer.train(small_job(), backend, hooks=[metrics.MetricsWriter(str(run_dir))])

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == list(range(1, 31))
    table = pq.read_table(run_dir / "metrics.parquet")
    assert table.schema == metrics.SCHEMA
    cols = table.to_pydict()
    assert cols["step"] == list(range(1, 31))
    assert cols["samples_seen"][-1] == 30 * 32 == state.samples_seen
    assert cols["epoch"][-1] == pytest.approx(30 / (8000 / 32))
    # held-out columns only on evaluated steps (every 10th), null elsewhere
    evaluated = [s for s, a in zip(cols["step"], cols["test_accuracy"]) if a is not None]
    assert evaluated == [10, 20, 30]
    assert cols["test_loss"][0] is None
    assert cols["test_accuracy"][-1] == state.metrics["test_accuracy"]
    assert cols["train_loss"] == [r["train_loss"] for r in rows]
    walls = cols["wall_s"]
    assert all(0 <= a <= b for a, b in zip(walls, walls[1:]))
    assert all(c >= 0 and m >= 0 for c, m in zip(cols["compute_s"], cols["comm_s"]))
    assert not list(run_dir.glob(".tmp-*"))


class LinesOnDisk(trainer.Hook):
    """After every step: how many lines metrics.jsonl has on disk, and whether metrics.parquet
    exists. Rounds of steps end at the given stops (hooks see a round after the hooks before
    them have seen all of it)."""

    def __init__(self, run_dir, stops=()):
        self.run_dir, self.seen, self.stops = run_dir, [], stops

    def next_stop(self, step):
        return next((at for at in self.stops if at > step), None)

    def on_step(self, state, record):
        path = self.run_dir / "metrics.jsonl"
        self.seen.append((len(path.read_text().splitlines()), (self.run_dir / "metrics.parquet").exists()))


def test_writer_buffers_lines_until_a_checkpoint_or_evaluated_step_and_writes_parquet_at_the_end(tmp_path, backend):
    run_dir = tmp_path / "run"
    writer = metrics.MetricsWriter(str(run_dir), checkpoint_every=5)
    writer.flush_s = 1e9  # only checkpoint steps, evaluated steps and the end write
    peek = LinesOnDisk(run_dir, stops=(3, 5, 10))  # rounds of steps 1-3, 4-5, 6-10 (evaluated at 7), 11-12
    trainer.train(small_job(steps=12, eval_every=7), backend, hooks=[writer, peek])
    assert peek.seen == [(0, False)] * 3 + [(5, False)] * 2 + [(10, False)] * 5 + [(12, False)] * 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 12
    assert pq.read_table(run_dir / "metrics.parquet").column("step").to_pylist() == list(range(1, 13))


def test_writer_with_flush_s_zero_writes_every_round(tmp_path, backend):
    run_dir = tmp_path / "run"
    writer = metrics.MetricsWriter(str(run_dir))
    writer.flush_s = 0.0
    peek = LinesOnDisk(run_dir, stops=range(1, 7))  # a round a step
    trainer.train(small_job(steps=6, eval_every=0), backend, hooks=[writer, peek])
    assert peek.seen == [(n, False) for n in range(1, 7)]


def test_writer_resume_keeps_records_up_to_the_resumed_step(tmp_path, backend):
    run_dir = str(tmp_path / "run")
    job = small_job(steps=20, eval_every=0)
    trainer.train(job, backend, hooks=[metrics.MetricsWriter(run_dir)])
    # resume from step 8 (as after loading a step-8 checkpoint): steps 9..20 are redone once
    state = trainer.initial_state(job)
    state.step, state.samples_seen = 8, 8 * 32
    trainer.train(job, backend, state=state, hooks=[metrics.MetricsWriter(run_dir)])
    steps = metrics.load(run_dir).column("step").to_pylist()
    assert steps == list(range(1, 21))


def test_torn_last_jsonl_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "tra')
    assert metrics.read_jsonl(path) == [{"step": 1, "train_loss": 2.0}]


def test_writer_on_nonfinite_loss_writes_null(tmp_path):
    run_dir = tmp_path / "run"
    writer = metrics.MetricsWriter(str(run_dir))
    state = trainer.TrainState(params={}, opt_state={})
    writer.on_start(state, {})
    record = {"step": 1, "epoch": 0.1, "samples_seen": 32, "train_loss": float("nan"), "lr": 0.1,
              "step_s": 0.001, "compute_s": 0.0, "comm_s": 0.001}
    writer.on_step(state, record)
    writer.on_end(state, record)
    assert json.loads((run_dir / "metrics.jsonl").read_text())["train_loss"] is None
    assert pq.read_table(run_dir / "metrics.parquet").column("train_loss").to_pylist() == [None]


GOOD = '{"step": 1, "train_loss": 2.0}'
BINARY = bytes(range(256)) * 4 + b"\n" + GOOD.encode() + b"\n"
HOSTILE = [  # (file, content, what the one-line error says)
    ("metrics.jsonl", [GOOD, "garbage", GOOD], "metrics.jsonl: line 2: not JSON"),
    ("metrics.jsonl", [GOOD, "[1, 2]"], "metrics.jsonl: line 2: not a step record"),
    ("metrics.jsonl", ['{"step": "1"}'], "metrics.jsonl: line 1: not a step record"),
    ("metrics.jsonl", ['{"step": true}'], "metrics.jsonl: line 1: not a step record"),
    ("metrics.jsonl", [GOOD, '{"step": 2, "train_loss": "x"}'], "line 2: train_loss is 'x', not a number"),
    ("metrics.jsonl", [GOOD, '{"step": 2, "samples_seen": 1.5}'], "line 2: samples_seen is 1.5, not a number"),
    ("metrics.jsonl", [GOOD, '{"step": 2, "epoch": {"a": 1}}'], "line 2: epoch is {'a': 1}, not a number"),
    ("metrics.jsonl", [GOOD, '{"step": 2, "samples_seen": %d}' % 2**64], f"line 2: samples_seen is {2**64}, not"),
    ("metrics.jsonl", ['{"step": 1' + "0" * 5000 + "}", GOOD], "line 1: not JSON"),
    ("metrics.jsonl", BINARY, "metrics.jsonl: line 1: not JSON"),
    ("metrics.parquet", BINARY, "metrics.parquet: not a readable metrics file"),
]
PLOT_EACH = """
import sys
from distmlp import metrics
for run_dir in sys.argv[1:]:
    try:
        metrics.plot(run_dir, run_dir + "/c.png")
        print("plotted")
    except metrics.MetricsError as e:
        print(str(e).replace(chr(10), "<newline>"))
"""


@pytest.mark.slow
def test_hostile_metrics_files_are_one_line_errors(tmp_path):
    """Every case plotted in one subprocess, so that a crash fails the test instead of pytest."""
    dirs = []
    for i, (name, content, _) in enumerate(HOSTILE):
        run_dir = tmp_path / str(i)
        run_dir.mkdir()
        blob = content if isinstance(content, bytes) else ("\n".join(content) + "\n").encode()
        (run_dir / name).write_bytes(blob)
        dirs.append(str(run_dir))
    proc = subprocess.run([sys.executable, "-c", PLOT_EACH, *dirs], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    assert len(out) == len(HOSTILE)
    for run_dir, line, (_, _, message) in zip(dirs, out, HOSTILE):
        assert line.startswith(run_dir) and message in line, (line, message)
        assert not (Path(run_dir) / "c.png").exists()


KILLED_RUN = """
import os, signal, sys
from distmlp import checkpoint, config, data, driver, metrics, trainer

class KillAt(trainer.Hook):
    def next_stop(self, step):  # a round of steps 11-13: the hooks before see it, nothing writes it
        return 13 if step < 13 else None

    def on_step(self, state, record):
        if record["step"] == 13:
            os.kill(os.getpid(), signal.SIGKILL)

run_dir = sys.argv[1]
metrics.MetricsWriter.flush_s = 1e9  # only checkpoint steps write: the worst case for a kill
job = config.load_job(overrides=["run.steps=20", "run.checkpoint_every=5", "optimizer.lr=0.1"])
ckpt = checkpoint.CheckpointHook(run_dir, job)
hooks = driver.run_hooks(job, run_dir, ckpt, quiet=True, echo=lambda line: None)
trainer.train(job, trainer.LocalBackend(data.resolve(dataset="mnist-sample")), hooks=[*hooks, KillAt()])
"""


@pytest.mark.slow
def test_a_killed_run_keeps_its_records_up_to_the_last_checkpoint_and_resumes(tmp_path, backend):
    """SIGKILL at step 13 (checkpoints every 5): metrics.jsonl has steps 1-10; resuming from the
    step-10 checkpoint continues it to a complete file."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run_dir)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [r["step"] for r in metrics.read_jsonl(run_dir / "metrics.jsonl")] == list(range(1, 11))
    path, ckpt = checkpoint.latest_valid(run_dir)
    assert ckpt.step == 10
    state = checkpoint.to_train_state(ckpt)
    trainer.train(ckpt.job, backend, state=state, hooks=[metrics.MetricsWriter(str(run_dir))])
    assert metrics.load(str(run_dir)).column("step").to_pylist() == list(range(1, 21))


def test_a_change_of_workers_is_a_record_in_metrics_jsonl_and_a_mark_on_the_plot(tmp_path, backend):
    """Elastic training's membership events go to metrics.jsonl beside the steps; step tables
    (metrics.parquet, load) leave them out; the plot draws a line at each."""
    run_dir = tmp_path / "run"
    writer = metrics.MetricsWriter(str(run_dir))
    change = {"event": "membership", "step": 4, "workers_before": 3, "workers_after": 2, "nodes": 2,
              "seconds": 1.5, "why": "lost worker(s) 2"}

    class Change(trainer.Hook):
        def next_stop(self, step):  # a round ends at step 4, as a regrouping does
            return 4 if step < 4 else None

        def on_step(self, state, record):
            if record["step"] == 4:
                writer.event(change)

    trainer.train(small_job(steps=8, eval_every=4), backend, hooks=[writer, Change()])
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 4, 5, 6, 7, 8]
    assert {k: v for k, v in lines[4].items() if k != "wall_s"} == change
    assert pq.read_table(run_dir / "metrics.parquet").column("step").to_pylist() == list(range(1, 9))
    assert metrics.load(str(run_dir)).column("step").to_pylist() == list(range(1, 9))
    assert [e["workers_after"] for e in metrics.events(str(run_dir))] == [2]
    fig = metrics.figure(str(run_dir))
    marks = [line for ax in fig.axes for line in ax.lines if list(line.get_xdata()) == [4, 4]]
    assert len(marks) == 2  # on the loss and the accuracy panels


def test_parquet_made_from_the_rounds_columns_is_the_json_lines_parsed(tmp_path):
    """metrics.parquet is made from the rounds' columns, not by parsing metrics.jsonl again; the
    parse gives the same table: non-finite numbers are null in both, and a resumed run's kept
    rows come first."""
    run_dir = tmp_path / "run"

    def steps(first, n, nan_at=(), evaluated=()):
        records = []
        for step in range(first, first + n):
            record = {"step": step, "epoch": step / 7, "samples_seen": 32 * step,
                      "train_loss": float("nan") if step in nan_at else 2.3 / step, "lr": 0.1,
                      "step_s": 1e-4 * step, "compute_s": 9e-5 * step, "comm_s": 1e-5 * step}
            if step in evaluated:
                record.update(test_loss=float("inf") if step in nan_at else 0.5 / step, test_accuracy=0.9)
            records.append(record)
        return trainer.Steps.from_records(records)

    def run(first_state, rounds):
        writer = metrics.MetricsWriter(str(run_dir))
        state = trainer.TrainState(params={}, opt_state={}, step=first_state)
        writer.on_start(state, {})
        for round_ in rounds:
            writer.on_steps(state, round_)
        writer.on_end(state, None)

    run(0, [steps(1, 5, evaluated=(5,)), steps(6, 4, nan_at=(7, 8), evaluated=(8,))])
    run(6, [steps(7, 4, nan_at=(9,), evaluated=(10,))])  # resumed after step 6: steps 7-9 again
    parsed = metrics.to_table([r for r in metrics.read_jsonl(run_dir / "metrics.jsonl")])
    table = pq.read_table(run_dir / "metrics.parquet")
    assert table.equals(parsed)
    cols = table.to_pydict()
    assert cols["step"] == list(range(1, 11))
    assert cols["train_loss"][8] is None and cols["train_loss"][6] == 2.3 / 7  # the resumed run's step 7
    assert [i + 1 for i, a in enumerate(cols["test_accuracy"]) if a is not None] == [5, 10]
    assert cols["wall_s"] == sorted(cols["wall_s"])


def test_json_lines_of_a_round_are_one_dump_per_record():
    records = [{"step": 1, "train_loss": 0.5, "comm_s": float("nan")}, {"step": 2, "train_loss": 1e-7},
               {"step": 3, "train_loss": 2.0, "test_loss": 0.25, "test_accuracy": 0.75}]
    expected = b"".join(metrics.orjson.dumps({**r, "wall_s": 1.25}, option=metrics.JSON_OPTIONS) for r in records)
    assert metrics.json_lines(records, 1.25) == expected
    assert metrics.json_lines([], 1.25) == b""


NO_PANDAS_RUN = """
import sys
from distmlp import config, driver
job = config.load_job(overrides=["run.steps=30", "run.eval_every=10", "run.checkpoint_every=10",
                                 "cluster.workers=0", f"run.run_dir={sys.argv[1]!r}"])
driver.run_job(job, json_mode=True, echo=lambda line: None)
print("pandas" in sys.modules)
"""


def test_a_run_writes_metrics_and_checkpoints_without_importing_pandas(tmp_path):
    """pa.array imports pandas (a third of a second) the first time it is called: the metrics
    files and checkpoints are made from NumPy buffers instead."""
    proc = subprocess.run([sys.executable, "-c", NO_PANDAS_RUN, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False"]
    assert metrics.load(str(tmp_path / "run")).column("step").to_pylist() == list(range(1, 31))
