"""Progress: the plain lines (interval-mean loss, ms/step, examples/s) and the rich bar on a terminal."""

import io
import re

import pytest
from rich.console import Console

from distmlp import config, data, progress, trainer


@pytest.fixture(scope="module")
def backend():
    return trainer.LocalBackend(data.resolve(dataset="mnist-sample"))


def small_job(steps=30, eval_every=10):
    return config.load_job(overrides=[f"run.steps={steps}", f"run.eval_every={eval_every}", "optimizer.lr=0.1"])


class Records(trainer.Hook):
    def __init__(self):
        self.records = []

    def on_step(self, state, record):
        self.records.append(record)


def test_format_line_matches_the_documented_shape():
    window = progress.Window()
    window.add([0.3, 0.32428], [0.00041, 0.00041], 64)
    record = {"step": 120, "epoch": 0.512, "train_loss": 9.9, "test_accuracy": 0.9123}
    assert progress.format_line(record, 1875, window) == \
        "step 120/1875 | epoch 0.51 | loss 0.3121 | acc 91.2% | 0.41 ms/step | 78,049 ex/s"
    del record["test_accuracy"]
    assert progress.format_line(record, 1875, window).endswith("| loss 0.3121 | 0.41 ms/step | 78,049 ex/s")


def test_lines_show_the_loss_and_speed_averaged_since_the_previous_line(backend):
    lines, seen = [], Records()
    trainer.train(small_job(steps=12, eval_every=0), backend,
                  hooks=[progress.Progress(log_every=4, echo=lines.append, bar=False), seen])
    assert [line.split(" | ")[0] for line in lines] == ["step 4/12", "step 8/12", "step 12/12"]
    for i, line in enumerate(lines):
        chunk = seen.records[4 * i:4 * i + 4]
        fields = line.split(" | ")
        mean_loss = sum(r["train_loss"] for r in chunk) / 4
        assert fields[2] == f"loss {mean_loss:.4f}"
        step_s = sum(r["step_s"] for r in chunk)
        assert fields[-2] == f"{1000 * step_s / 4:.2f} ms/step"
        assert fields[-1] == f"{4 * 32 / step_s:,.0f} ex/s"
    assert fields[2] != f"loss {chunk[-1]['train_loss']:.4f}"  # not the last minibatch's loss


def test_progress_logs_every_nth_evaluated_and_last_step(backend):
    lines = []
    trainer.train(small_job(steps=10, eval_every=3), backend,
                  hooks=[progress.Progress(log_every=4, echo=lines.append, bar=False)])
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [3, 4, 6, 8, 9, 10]
    assert all(line.endswith("ex/s") for line in lines)
    assert "acc" in lines[0] and "acc" not in lines[1]


def test_progress_default_is_about_twenty_lines(backend):
    lines = []
    trainer.train(small_job(steps=100, eval_every=0), backend,
                  hooks=[progress.Progress(echo=lines.append, bar=False)])
    assert len(lines) == 20
    assert lines[-1].startswith("step 100/100 |")


def test_no_bar_when_stdout_is_not_a_terminal_or_quiet():
    assert progress.Progress().bar is False  # pytest's stdout is not a terminal
    assert progress.Progress(quiet=True).bar is False


def test_bar_on_a_terminal_shows_steps_loss_speed_and_eta_above_which_lines_scroll(backend):
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    hook = progress.Progress(log_every=5, bar=console, echo=pytest.fail)  # lines go to the bar's console
    state = trainer.train(small_job(steps=10, eval_every=0), backend, hooks=[hook])
    text = out.getvalue()
    assert "step 5/10 |" in text and "step 10/10 |" in text
    frames = [frame for frame in text.split("\r") if "ETA" in frame]
    assert frames, text
    assert any(re.search(r"━ 10/10 loss \d\.\d{4} [\d,]+ ex/s \d:\d\d:\d\d ETA \d:\d\d:\d\d", frame)
               for frame in frames), frames
    assert hook.examples_per_s > 0 and state.samples_seen == 10 * 32


def test_examples_per_s_is_the_runs_wall_clock_throughput(backend, monkeypatch):
    clock = iter(range(100))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: float(next(clock)))
    hook = progress.Progress(log_every=100, echo=lambda line: None, bar=False)
    state = trainer.train(small_job(steps=3, eval_every=0), backend, hooks=[hook])
    # on_start read the clock once and on_end once: the run took (reads - 1) fake seconds
    assert hook.examples_per_s == pytest.approx(state.samples_seen / (next(clock) - 1))


def test_a_rounds_lines_are_the_lines_of_its_steps_one_at_a_time():
    """Progress takes a round's steps as columns; the lines are those of the same records
    handed over one at a time."""
    records = [{"step": s, "epoch": s / 7, "samples_seen": 32 * s, "train_loss": 1 / s, "lr": 0.1,
                "step_s": 1e-4 * (1 + s % 3), "compute_s": 1e-4, "comm_s": 0.0} for s in range(1, 24)]
    records[8].update(test_loss=0.4, test_accuracy=0.875)  # step 9
    outputs = []
    for rounds in ([records], [records[:5], records[5:9], records[9:]], [[r] for r in records]):
        lines = []
        hook = progress.Progress(log_every=4, echo=lines.append, bar=False)
        state = trainer.TrainState(params={}, opt_state={})
        hook.on_start(state, {"steps": 23})
        for part in rounds:
            hook.on_steps(state, trainer.Steps.from_records(part))
        outputs.append(lines)
    assert [line.split(" | ")[0] for line in outputs[0]] == [
        f"step {s}/23" for s in (4, 8, 9, 12, 16, 20, 23)]
    assert outputs[0] == outputs[1] == outputs[2]
    assert "acc 87.5%" in outputs[0][2]
