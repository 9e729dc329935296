"""`distmlp plot`: a real PNG from a real run's metrics, and one-line errors."""

import builtins
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from distmlp import config, data, metrics, trainer
from distmlp.cli import app

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory written by MetricsWriter over 300 real training steps."""
    path = tmp_path_factory.mktemp("runs") / "20260101-000000-plot"
    job = config.load_job(overrides=["run.steps=300", "run.eval_every=25", "optimizer.lr=0.1"])
    backend = trainer.LocalBackend(data.resolve(dataset="mnist-sample"))
    trainer.train(job, backend, hooks=[metrics.MetricsWriter(str(path))])
    return path


def test_plot_command_writes_a_png(run_dir, tmp_path):
    out = tmp_path / "figs" / "curves.png"
    r = subprocess.run([str(Path(sys.executable).parent / "distmlp"), "plot", str(run_dir), "-o", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    blob = out.read_bytes()
    assert blob.startswith(PNG_SIGNATURE)
    assert len(blob) > 20_000  # two panels of curves, not an empty canvas
    width, height = int.from_bytes(blob[16:20], "big"), int.from_bytes(blob[20:24], "big")
    assert (width, height) == (1100, 400)


def test_plot_from_jsonl_only_while_a_run_is_going(run_dir, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:40]
    (live / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert metrics.load(str(live)).num_rows == 40
    assert metrics.plot(str(live), str(tmp_path / "c.png")) == str(tmp_path / "c.png")


def test_missing_run_dir_and_empty_metrics_are_one_line_errors(tmp_path):
    r = runner.invoke(app, ["plot", str(tmp_path / "nope"), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "no such run directory" in r.output
    r = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "no metrics.parquet or metrics.jsonl" in r.output
    (tmp_path / "metrics.jsonl").write_text("")
    r = runner.invoke(app, ["plot", str(tmp_path), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "no steps yet" in r.output
    assert not (tmp_path / "c.png").exists()


def test_missing_matplotlib_names_the_extra(run_dir, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 2
    assert r.output.strip() == "error: plotting needs matplotlib: pip install 'distmlp[plot]'"


def centered_mean(values, half):
    """Reference: the mean of values[i - half .. i + half] clipped to the list, with numpy."""
    a = np.asarray(values, dtype=float)
    return [a[max(i - half, 0):i + half + 1].mean() for i in range(len(a))]


def test_figure_draws_the_batch_loss_and_its_moving_average(run_dir):
    fig = metrics.figure(str(run_dir))
    try:
        lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
        assert set(lines) == {"train (batch)", "train (moving average)", "held-out"}
        cols = metrics.load(str(run_dir)).to_pydict()
        raw, smooth = lines["train (batch)"], lines["train (moving average)"]
        assert list(raw.get_xdata()) == list(smooth.get_xdata()) == cols["step"]
        assert list(raw.get_ydata()) == cols["train_loss"]
        # 300 steps: a window of 2 % = 6 steps -> 3 on each side, 7 in all
        assert np.allclose(smooth.get_ydata(), centered_mean(cols["train_loss"], 3))
        assert np.std(np.diff(smooth.get_ydata())) < np.std(np.diff(raw.get_ydata())) / 3
    finally:
        import matplotlib.pyplot as plt
        plt.close(fig)


def test_smooth_skips_non_finite_values_and_keeps_short_series_raw():
    assert metrics.smooth([1.0, 2.0, 3.0]) == [1.0, 2.0, 3.0]
    values = [1.0, float("nan"), 3.0, None, 5.0] * 40  # 200 values: 2 on each side
    reference = [np.nanmean([v for v in values[max(i - 2, 0):i + 3] if v is not None]) for i in range(200)]
    assert np.allclose(metrics.smooth(values), reference)
