"""Bad job FILES given to `distmlp train`: one line naming the key and what is allowed, exit 2,
no run directory (test_config.py covers the same mistakes as --set and shortcut options)."""

import pytest
from typer.testing import CliRunner

from distmlp.cli import app

# (job file body without [run] run_dir, what the one line must contain)
BAD_JOB_FILES = [
    ('[optimizer]\nbatch_size = 8001\n', ["optimizer.batch_size: 8001", "larger than the 8000 training examples"]),
    ('[cluster]\nworkers = -1\n', ["cluster.workers: -1", "must be >= 0"]),
    ('[cluster]\nworkers = -3\n', ["cluster.workers: -3", "must be >= 0"]),
    ('[optimizer]\nname = "adam"\n', ["optimizer.name: 'adam'", "allowed: sgd, minibatch, gd"]),
    ('[optimizer]\nlr = -0.01\n', ["optimizer.lr: -0.01", "must be a finite number > 0"]),
    ('[optimizer]\nlr = "fast"\n', ["optimizer.lr: expected float", "'fast'"]),
    ('[optimizer]\nlr = nan\n', ["optimizer.lr: nan", "must be a finite number > 0"]),
    ('[optimizer]\nlr = inf\n', ["optimizer.lr: inf", "must be a finite number > 0"]),
    ('[optimizer]\nname = "gd"\nmomentum = 1.5\n', ["optimizer.momentum: 1.5", "must be in [0, 1)"]),
    ('[run]\non_nonfinite = "ignore"\n', ["run.on_nonfinite: 'ignore'", "allowed: stop, skip"]),
    ('[cluster]\nmax_failures = -2\n', ["cluster.max_failures: -2", "must be >= -1 (-1: unlimited)"]),
    ('[cluster]\nstep_timeout_s = 0\n', ["cluster.step_timeout_s: 0", "must be > 0"]),
    ('[data]\npath = "no/such/dir"\n', ["no/such/dir"]),
]


def write_job(tmp_path, body):
    """A job file whose [run] table names the run directory (so a leftover one would be found)."""
    run_dir = tmp_path / "run"
    if "[run]" in body:
        body = body.replace("[run]\n", f'[run]\nrun_dir = "{run_dir}"\n')
    else:
        body += f'[run]\nrun_dir = "{run_dir}"\n'
    (tmp_path / "job.toml").write_text(body)
    return tmp_path / "job.toml", run_dir


def assert_one_line_exit_2(result, expected, tmp_path, run_dir):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in expected:
        assert part in lines[0], lines[0]
    assert result.stdout == ""
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("body, expected", BAD_JOB_FILES, ids=[b.split("\n")[1] for b, _ in BAD_JOB_FILES])
def test_bad_job_file_exits_2_with_one_line_and_no_run_directory(tmp_path, monkeypatch, body, expected):
    monkeypatch.chdir(tmp_path)
    job_file, run_dir = write_job(tmp_path, body)
    result = CliRunner().invoke(app, ["train", str(job_file)])
    assert_one_line_exit_2(result, expected, tmp_path, run_dir)


@pytest.mark.parametrize("args, expected", [
    (["--workers", "-1"], ["cluster.workers: -1", "must be >= 0"]),
    (["--lr", "-1"], ["optimizer.lr: -1.0", "must be a finite number > 0"]),
    (["--optimizer", "adam"], ["optimizer.name: 'adam'", "allowed: sgd, minibatch, gd"]),
    (["--batch-size", "9000"], ["optimizer.batch_size: 9000", "larger than the 8000 training examples"]),
], ids=["workers", "lr", "optimizer", "batch-size"])
def test_a_bad_option_over_a_good_job_file_is_refused_the_same_way(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    job_file, run_dir = write_job(tmp_path, '[optimizer]\nname = "minibatch"\n')
    result = CliRunner().invoke(app, ["train", str(job_file), *args])
    assert_one_line_exit_2(result, expected, tmp_path, run_dir)


def test_more_workers_than_examples_is_refused_before_anything_is_written(ray_session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job_file, run_dir = write_job(tmp_path, '[optimizer]\nname = "gd"\n[cluster]\nworkers = 8001\n')
    result = CliRunner().invoke(app, ["train", str(job_file)])
    assert_one_line_exit_2(result, ["cluster.workers: 8001 workers for only 8000 training examples"],
                           tmp_path, run_dir)
