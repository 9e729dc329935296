"""MetricsWriter and Progress as hooks of the real training loop (LocalBackend, bundled sample)."""

import json

import pyarrow.parquet as pq
import pytest

from distmlp import config, data, metrics, trainer


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


def test_writer_parquet_is_written_during_the_run(tmp_path, backend):
    run_dir = tmp_path / "run"
    seen = []

    class Peek(trainer.Hook):
        def on_start(self, state, info): pass
        def on_end(self, state, record): pass

        def on_step(self, state, record):
            path = run_dir / "metrics.parquet"
            seen.append(pq.read_table(path).num_rows if path.exists() else 0)

    trainer.train(small_job(steps=12, eval_every=0), backend,
                  hooks=[metrics.MetricsWriter(str(run_dir), parquet_every=5), Peek()])
    assert seen == [0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10, 10]


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


def test_format_line_matches_the_documented_shape():
    record = {"step": 120, "epoch": 0.512, "train_loss": 0.31214, "test_accuracy": 0.9123}
    assert metrics.format_line(record, 1875, 0.4142) == \
        "step 120/1875 | epoch 0.51 | loss 0.3121 | acc 91.2% | 0.41 ms/step"
    del record["test_accuracy"]
    assert metrics.format_line(record, 1875, 12.0) == "step 120/1875 | epoch 0.51 | loss 0.3121 | 12.00 ms/step"


def test_progress_logs_every_nth_evaluated_and_last_step(backend):
    lines = []
    progress = metrics.Progress(log_every=4, echo=lines.append, bar=False)
    trainer.train(small_job(steps=10, eval_every=3), backend, hooks=[progress])
    logged = [int(line.split()[1].split("/")[0]) for line in lines]
    assert logged == [3, 4, 6, 8, 9, 10]
    assert all(line.endswith("ms/step") for line in lines)
    assert "acc" in lines[0] and "acc" not in lines[1]


def test_progress_default_is_about_twenty_lines(backend):
    lines = []
    trainer.train(small_job(steps=100, eval_every=0), backend,
                  hooks=[metrics.Progress(echo=lines.append, bar=False)])
    assert len(lines) == 20
    assert lines[-1].startswith("step 100/100 |")


def test_progress_not_a_tty_has_no_bar(capsys):
    progress = metrics.Progress(log_every=1)  # pytest's stdout is not a terminal
    assert progress.show_bar is False
    assert metrics.Progress(quiet=True, bar=None).show_bar is False


def test_progress_with_bar_still_prints_lines(backend, capsys):
    progress = metrics.Progress(log_every=5, bar=True)
    trainer.train(small_job(steps=10, eval_every=0), backend, hooks=[progress])
    out = capsys.readouterr().out
    assert "step 5/10 |" in out and "step 10/10 |" in out
