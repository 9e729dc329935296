"""What `distmlp train` prints: the end-of-run summary, --json and --quiet."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distmlp import config
from distmlp.cli import app, train_cmd

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = {"run_dir": "runs/r 1", "checkpoint": "runs/r 1/checkpoints/step-000100", "workers": 2,
           "optimizer": "minibatch", "steps": 100, "epochs": 0.4, "train_loss": 0.5, "test_loss": 0.41234,
           "test_accuracy": 0.91234, "wall_s": 12.34, "examples_per_s": 12345.6,
           "best_checkpoint": "runs/r 1/checkpoints/step-000080", "dataset": "mnist-sample", "data_path": None}


@pytest.fixture
def fake_training(monkeypatch):
    """Replace the training run by one that prints a progress line and returns SUMMARY."""
    calls = []

    def run_training(job, resume=None, json_mode=False, echo=print, address=None, resume_updates=None):
        calls.append({"json_mode": json_mode})
        echo("step 1/100 | progress")
        return dict(SUMMARY)
    monkeypatch.setattr(train_cmd, "run_training", run_training)
    return calls


def test_summary_names_results_paths_and_next_commands(fake_training):
    result = CliRunner().invoke(app, ["train", "--steps", "100"])
    assert result.exit_code == 0, result.output
    assert fake_training == [{"json_mode": False}]
    assert result.stdout.splitlines() == [
        "step 1/100 | progress",
        "done: held-out accuracy 91.23% | loss 0.4123 | 100 steps | 12,346 examples/s | 12.3 s",
        "  run directory    runs/r 1",
        "  best checkpoint  runs/r 1/checkpoints/step-000080",
        "  plot the curves  distmlp plot 'runs/r 1' -o curves.png",
        "  evaluate it      distmlp evaluate 'runs/r 1/checkpoints/step-000080' --dataset mnist-sample",
        "  TensorBoard      tensorboard --logdir 'runs/r 1'",
    ]


def test_summary_of_a_run_on_a_data_directory_evaluates_on_it(fake_training, monkeypatch):
    text = train_cmd.format_summary({**SUMMARY, "data_path": "/data/my mnist", "dataset": None})
    assert "distmlp evaluate 'runs/r 1/checkpoints/step-000080' --data '/data/my mnist'" in text


def test_json_mode_keeps_the_json_line_last_and_progress_on_stderr(fake_training):
    result = CliRunner().invoke(app, ["train", "--steps", "100", "--json"])
    assert result.exit_code == 0, result.output
    assert fake_training == [{"json_mode": True}]
    assert [json.loads(line) for line in result.stdout.splitlines()] == [SUMMARY]
    assert result.stderr.splitlines() == ["step 1/100 | progress"]


@pytest.mark.parametrize("flags,json_line", [(["--quiet"], False), (["-q", "--json"], True)])
def test_quiet_prints_only_the_summary(fake_training, flags, json_line):
    result = CliRunner().invoke(app, ["train", "--steps", "100", *flags])
    assert result.exit_code == 0, result.output
    assert fake_training == [{"json_mode": True}]  # no bar either
    assert result.stderr == "" and "progress" not in result.stdout
    out = result.stdout.splitlines()
    assert (json.loads(out[-1]) == SUMMARY) if json_line else out[0].startswith("done: held-out accuracy 91.23%")


@pytest.mark.slow
def test_real_run_prints_the_summary_and_leaves_tensorboard_events(tmp_path):
    """A short real CLI run in a subprocess: the summary's paths exist and its commands work."""
    run_dir = tmp_path / "run"
    distmlp = str(Path(sys.executable).with_name("distmlp"))
    env = os.environ | {"RAY_ADDRESS": ""}
    proc = subprocess.run([distmlp, "train", "--dataset", "mnist-sample", "--steps", "60", "--workers", "2",
                           "--set", "optimizer.lr=0.1", "--set", "run.eval_every=20", "--run-dir", str(run_dir)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    done = next(i for i, line in enumerate(out) if line.startswith("done: held-out accuracy"))
    assert out[done - 1].startswith("step 60/60 | epoch ") and out[done - 1].endswith("ex/s")
    assert out[done + 1] == f"  run directory    {run_dir}"
    best = out[done + 2].split("best checkpoint  ")[1]
    assert Path(best, "manifest.json").is_file() and Path(best).parent == run_dir / "checkpoints"
    assert list(run_dir.glob("events.out.tfevents.*"))
    evaluate = out[done + 4].split("evaluate it      ")[1].split() + ["--json"]
    assert evaluate[:2] == ["distmlp", "evaluate"]
    scored = subprocess.run([distmlp, *evaluate[1:]], capture_output=True, text=True, timeout=300)
    assert scored.returncode == 0, scored.stderr
    acc = json.loads(scored.stdout)["test_accuracy"]
    assert f"held-out accuracy {acc:.2%}" in out[done]  # one checkpoint, the last step's
    plot = out[done + 3].split("plot the curves  ")[1].replace("curves.png", str(tmp_path / "c.png")).split()
    assert subprocess.run([distmlp, *plot[1:]], capture_output=True, timeout=300).returncode == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert config.load_job(run_dir / "job.toml").run.steps == 60
