"""What a run shows while it trains: a line per logged step, and a progress bar on a terminal.

Progress is a training-loop hook (on_start, on_steps after every round of steps, on_end). Its lines show
the training loss averaged over the steps since the previous line, not one minibatch's loss.
"""

import math
import sys
import time

import numpy as np

from distmlp.trainer import Hook, Steps

BAR_REFRESH_S = 0.1  # the bar's numbers change at most this often


def format_line(record, steps, window):
    """`step 120/1875 | epoch 0.51 | loss 0.3121 | acc 91.2% | 0.41 ms/step | 78,049 ex/s`: loss,
    step time and examples/s over window; acc when the step was evaluated."""
    parts = [f"step {record['step']}/{steps}", f"epoch {record['epoch']:.2f}", f"loss {window.loss:.4f}"]
    if record.get("test_accuracy") is not None:
        parts.append(f"acc {100 * record['test_accuracy']:.1f}%")
    parts += [f"{window.ms_per_step:.2f} ms/step", f"{window.examples_per_s:,.0f} ex/s"]
    return " | ".join(parts)


def default_log_every(steps, lines=20):
    """About `lines` progress lines over a run of `steps` steps."""
    return max(1, math.ceil(steps / lines))


class Window:
    """Sums over the steps since the last reset: training loss, step seconds, examples."""

    def __init__(self):
        self.steps, self.loss_sum, self.step_s, self.examples = 0, 0.0, 0.0, 0

    def add(self, losses, step_s, examples):
        """Add steps: their training losses and step seconds (lists), and the examples they trained on."""
        self.steps += len(losses)
        self.loss_sum = sum(losses, self.loss_sum)
        self.step_s = sum(step_s, self.step_s)
        self.examples += examples

    @property
    def loss(self):
        return self.loss_sum / max(self.steps, 1)

    @property
    def ms_per_step(self):
        return 1000 * self.step_s / max(self.steps, 1)

    @property
    def examples_per_s(self):
        return self.examples / self.step_s if self.step_s > 0 else 0.0


class Progress(Hook):
    """One line per logged step (every log_every-th, every evaluated one, the last one) through
    echo, and a rich progress bar (steps, loss, examples/s, elapsed, ETA) above which the lines
    scroll.

    log_every=0 means about 20 lines a run. bar: None shows it on stdout when that is a
    terminal and quiet is False; False never; or the rich Console to draw it on. After on_end,
    examples_per_s holds the run's training examples per second of wall time.
    """

    def __init__(self, log_every=0, quiet=False, echo=print, bar=None):
        self.log_every = log_every
        self.echo = echo
        self.bar = (not quiet and sys.stdout.isatty()) if bar is None else bar
        self.examples_per_s = None
        self._bar = None

    def on_start(self, state, info):
        self.steps = info["steps"]
        self.every = self.log_every or default_log_every(self.steps)
        self._line_window, self._bar_window = Window(), Window()
        self._samples = self._samples0 = self._bar_samples = state.samples_seen
        self._t0 = self._bar_t = time.perf_counter()
        if self.bar:
            self._start_bar(state.step)

    def on_step(self, state, record):
        self.on_steps(state, Steps.from_records([record]))

    def on_steps(self, state, steps):
        c = steps.columns
        step = c["step"]
        due = (step % self.every == 0) | (step == self.steps)
        due[list(steps.tests)] = True
        losses, step_s, samples = c["train_loss"].tolist(), c["step_s"].tolist(), c["samples_seen"].tolist()
        start = 0
        for end in (*np.flatnonzero(due).tolist(), len(step) - 1):  # the lines, then the rest of the round
            if end >= start:
                self._line_window.add(losses[start:end + 1], step_s[start:end + 1], samples[end] - self._samples)
                self._samples = samples[end]
                if due[end]:
                    self._line(steps.record(end))
                start = end + 1
        if self._bar is not None:
            self._bar_window.add(losses, step_s, samples[-1] - self._bar_samples)
            self._bar_samples = samples[-1]
            now = time.perf_counter()
            if now - self._bar_t >= BAR_REFRESH_S or step[-1] == self.steps:
                self._update_bar(int(step[-1]))
                self._bar_t = now

    def on_end(self, state, record):
        if self._line_window.steps and record:
            self._line(record)
        elapsed = time.perf_counter() - self._t0
        self.examples_per_s = (state.samples_seen - self._samples0) / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def _start_bar(self, step):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        console = self.bar if isinstance(self.bar, Console) else None
        self._bar = Bar(TextColumn("step"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} ex/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task("train", total=self.steps, completed=step, loss="-", speed="-")

    def _update_bar(self, step):
        w = self._bar_window
        self._bar.update(self._task, completed=step, loss=f"{w.loss:.4f}", speed=f"{w.examples_per_s:,.0f}")
        self._bar_window = Window()

    def _line(self, record):
        line = format_line(record, self.steps, self._line_window)
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            self.echo(line)
        self._line_window = Window()
