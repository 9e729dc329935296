"""`distmlp train` end to end: the README's quick start, job files, and user mistakes."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distmlp import checkpoint, config
from distmlp.cli import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "jobs" / "*.toml"))), ids=os.path.basename)
def test_every_job_file_loads(path):
    job = config.load_job(path)
    assert job.optimizer.name in config.OPTIMIZERS


def test_seed_jobs_use_the_seeds_settings():
    sgd, mini, gd = (config.load_job(ROOT / "jobs" / f"mnist-{n}.toml") for n in ("sgd", "minibatch", "gd"))
    assert (sgd.optimizer.learning_rate, sgd.optimizer.sampling_mode) == (0.001, "sequential")
    assert (mini.optimizer.learning_rate, mini.optimizer.batch_size, mini.optimizer.sampling_mode,
            mini.run.steps) == (0.001, 32, "sample", 10000)
    assert (gd.optimizer.learning_rate, gd.run.epochs) == (0.05, 100)


def test_quickstart_trains_to_90_percent(tmp_path):
    """The README's first command (with --json and a run directory of the test's own)."""
    run_dir = tmp_path / "run"
    distmlp = Path(sys.executable).with_name("distmlp")
    proc = subprocess.run([str(distmlp), "train", str(ROOT / "jobs" / "quickstart.toml"), "--json",
                           "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=600,
                          env=os.environ | {"RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(proc.stdout.strip().splitlines()) == 1, "with --json, stdout holds only the summary"
    assert set(summary) == {"run_dir", "checkpoint", "workers", "optimizer", "steps", "epochs",
                            "train_loss", "test_loss", "test_accuracy", "wall_s", "membership",
                            "examples_per_s", "best_checkpoint", "dataset", "data_path"}
    assert summary["membership"] == []  # no worker came or went
    assert summary["best_checkpoint"] == summary["checkpoint"] and summary["examples_per_s"] > 0
    assert summary["test_accuracy"] >= 0.90, summary
    assert (summary["workers"], summary["optimizer"], summary["steps"]) == (2, "minibatch", 1250)
    assert config.load_job(run_dir / "job.toml") == config.load_job(ROOT / "jobs" / "quickstart.toml",
                                                                    updates={"run.run_dir": str(run_dir)})
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert len(metrics) == 1250 and metrics[-1]["test_accuracy"] == summary["test_accuracy"]
    assert all(r["compute_s"] >= 0 and r["comm_s"] >= 0 for r in metrics)
    ckpt = checkpoint.load(summary["checkpoint"])
    assert ckpt.step == 1250 and ckpt.metrics["test_accuracy"] == summary["test_accuracy"]
    assert "2 workers on 1 node(s)" in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    (["--address", "http://127.0.0.1:8265"], "use `distmlp submit`"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--data", "/nonexistent/dir"], "/nonexistent/dir: no such data directory"),
    (["--batch-size", "9000"], "optimizer.batch_size: 9000 is larger than the 8000 training examples"),
    (["--workers", "-1"], "cluster.workers"),
    (["--set", "optimizer.lr"], "expected section.key=value"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--steps", "1", "--run-dir", str(run_dir), *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("args,message", [
    (["--resume", "/nonexistent/run"], "/nonexistent/run"),
    (["--resume", "/nonexistent/run", "--lr", "0.5"], "--resume: optimizer.lr would change the run's math"),
    (["--resume", "/nonexistent/run", "--set", "run.seed=3"], "--resume: run.seed would change the run's math"),
    (["--resume", "/nonexistent/run", "--set", "model.sizes=[784, 10]"], "--resume: model.sizes would change"),
    (["--resume", "/nonexistent/run", "--run-dir", "x"], "--resume takes the job and run directory saved in RUN_DIR"),
])
def test_resume_mistakes_are_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_workers_0_trains_in_this_process_without_ray(tmp_path):
    """--workers 0: the whole run (data, steps, evaluation, checkpoint, metrics) in the CLI's own
    process, with Ray never imported, so start-up costs no Ray and a debugger sees every step."""
    script = ("import json, sys\n"
              "from typer.testing import CliRunner\n"
              "from distmlp.cli import app\n"
              f"r = CliRunner().invoke(app, ['train', '--workers', '0', '--steps', '3', '--run-dir', {str(tmp_path / 'run')!r},"
              " '--json'])\n"
              "print(json.dumps({'code': r.exit_code, 'ray': 'ray' in sys.modules, 'out': r.stdout}))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and result["ray"] is False, result
    summary = json.loads(result["out"].strip().splitlines()[-1])
    assert (summary["workers"], summary["steps"]) == (0, 3)
    assert checkpoint.load(summary["checkpoint"]).step == 3
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "job.toml").is_file()


def test_resume_never_takes_the_cluster_address_from_the_run_directory(tmp_path, monkeypatch):
    """A run directory from elsewhere could name its owner's cluster, which would then get this
    user's Ray token and send back results to unpickle: the address comes from --address only."""
    from distmlp import driver, trainer
    job = config.load_job(None, ["cluster.workers=0", "run.steps=4", 'cluster.address="10.9.9.9:6379"'])
    state = trainer.initial_state(job)
    checkpoint.save_in_run(tmp_path / "run", state, job,
                           trainer.make_sampler(job, 8000).state())
    seen = []
    real = driver.start_backend
    monkeypatch.setattr(driver, "start_backend", lambda source, j, echo, on_change: (
        seen.append(j.cluster.address), real(source, j, echo, on_change))[1])
    driver.run_job(None, resume=str(tmp_path / "run"), echo=lambda line: None)
    driver.run_job(None, resume=str(tmp_path / "run"), echo=lambda line: None, address="127.0.0.1:7",
                   resume_updates={"run.steps": 6})
    assert seen == [None, "127.0.0.1:7"]
