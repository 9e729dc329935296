"""`distmlp sweep`: the search-space parser, the checks made before any trial starts, training
in-process (cluster.workers = 0), and a real sweep on Ray Tune with ASHA early stopping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ray import tune
from threadpoolctl import threadpool_limits
from typer.testing import CliRunner

from distmlp import checkpoint, config, data, driver, metrics, sweep, trainer
from distmlp.cli import app
from distmlp.errors import UserError

DISTMLP = str(Path(sys.executable).with_name("distmlp"))


@pytest.mark.parametrize("text,kind,args", [
    ("optimizer.lr=loguniform(0.001, 1)", "loguniform", (0.001, 1)),
    ("optimizer.lr = uniform( 0.01 , 0.5 )", "uniform", (0.01, 0.5)),
    ("optimizer.batch_size=randint(8, 65)", "randint", (8, 65)),
    ("optimizer.batch_size=choice(16, 32, 64)", "choice", (16, 32, 64)),
    ("optimizer.name=choice(sgd, minibatch)", "choice", ("sgd", "minibatch")),
    ('optimizer.name=choice("gd", "minibatch")', "choice", ("gd", "minibatch")),
    ("model.sizes=choice([784, 32, 10], [784, 16, 16, 10])", "choice", ([784, 32, 10], [784, 16, 16, 10])),
    ("optimizer.momentum=grid(0.0, 0.9)", "grid", (0.0, 0.9)),
])
def test_search_spaces_parse(text, kind, args):
    space = sweep.parse_space(text)
    assert (space.key, space.kind, space.args) == (text.split("=")[0].strip(), kind, args)


def test_spaces_become_tune_domains():
    draws = sweep.parse_space("optimizer.lr=loguniform(0.001, 1)").to_tune().sample(size=2000, random_state=1)
    assert 0.001 <= min(draws) and max(draws) < 1
    # log-uniform: about a third of the draws in each decade
    assert [np.mean((np.array(draws) >= lo) & (np.array(draws) < lo * 10)) for lo in (0.001, 0.01, 0.1)] \
        == pytest.approx([1 / 3] * 3, abs=0.05)
    ints = sweep.parse_space("optimizer.batch_size=randint(8, 11)").to_tune().sample(size=300, random_state=1)
    assert set(ints) == {8, 9, 10}
    assert sweep.parse_space("optimizer.batch_size=choice(16, 32)").to_tune().categories == [16, 32]
    assert sweep.parse_space("optimizer.momentum=grid(0.0, 0.9)").to_tune() == tune.grid_search([0.0, 0.9])
    assert sweep.parse_space("optimizer.batch_size=randint(8, 65)").representatives() == (8, 64)


def test_plain_values_stay_fixed_overrides():
    fixed, spaces = sweep.parse_sets(["optimizer.lr=0.1", 'data.dataset="choice(a)"', "optimizer.lr=choice(0.1, 1)"])
    assert fixed == ["optimizer.lr=0.1", 'data.dataset="choice(a)"']
    assert [(s.key, s.args) for s in spaces] == [("optimizer.lr", (0.1, 1))]
    assert config.load_job(None, fixed).data.dataset == "choice(a)"


@pytest.mark.parametrize("text,message", [
    ("optimizer.lr=normal(0, 1)", "unknown search space 'normal'; allowed: loguniform, uniform"),
    ("optimizer.lr=loguniform(0, 1)", "loguniform needs 0 < low"),
    ("optimizer.lr=uniform(1, 0.5)", "uniform needs low < high, got 1 and 0.5"),
    ("optimizer.lr=uniform(1)", "uniform needs two finite numbers"),
    ("optimizer.lr=uniform(a, b)", "uniform needs two finite numbers"),
    ("optimizer.lr=uniform(nan, 1)", "uniform needs two finite numbers"),
    ("optimizer.lr=uniform(true, 2)", "uniform needs two finite numbers"),
    ("optimizer.batch_size=randint(1.5, 4)", "randint needs two integers"),
    ("optimizer.lr=choice()", "choice needs at least one value"),
    ("optimizer.lr=choice(1,,2)", "empty value"),
    ("optimizer.lr=choice(__import__('os').getcwd())", "cannot read"),
    ("optimizerlr=choice(1, 2)", "expected section.key=value"),
    ("run.run_dir=choice(a, b)", "run.run_dir is set by the sweep (--sweep-dir)"),
    ("cluster.workers=choice(1, 2)", "set by the sweep (--workers-per-trial)"),
])
def test_bad_spaces_are_one_line_errors(text, message):
    with pytest.raises(UserError) as e:
        sweep.parse_space(text)
    assert str(e.value).startswith(f"--set {text!r}: ") and message in str(e.value)
    assert len(str(e.value).splitlines()) == 1


def test_a_key_gets_one_space():
    with pytest.raises(sweep.SweepError, match="optimizer.lr already has a search space"):
        sweep.parse_sets(["optimizer.lr=choice(0.1, 1)", "optimizer.lr=uniform(0.1, 1)"])


SHORT = ["--set", "run.steps=100", "--set", "run.eval_every=50"]


@pytest.mark.parametrize("args,message", [
    (["--set", "optimizer.foo=choice(1, 2)"], "--set 'optimizer.foo=choice(1, 2)': optimizer.foo: unknown key"),
    (["--set", "optimizer.batch_size=choice(16, 0)"], "optimizer.batch_size: 0 is not allowed; must be >= 1"),
    (["--set", "optimizer.batch_size=choice(16, 9000)"], "9000 is larger than the 8000 training examples"),
    (["--set", "optimizer.lr=choice(0.1, fast)"], "optimizer.lr: expected float, got 'fast'"),
    (["--set", "optimizer.lr=uniform(-1, 1)"], "optimizer.lr: -1.0 is not allowed"),
    (["--set", "nosuch.lr=choice(1, 2)"], "unknown table [nosuch]"),
    (["--set", "optimizer.momentum=2", "--set", "optimizer.lr=choice(0.1, 1)"], "optimizer.momentum: 2.0"),
    (["--set", "run.eval_every=0", "--set", "optimizer.lr=choice(0.1, 1)"], "run.eval_every is 0"),
    ([], "no search space"),
    (["--set", "optimizer.lr=choice(0.1, 1)", "--grace-period", "3"],
     "--grace-period 3: a trial makes at most 2 evaluations"),
    (["--set", "optimizer.lr=choice(0.1, 1)", "--metric", "accuracy"], "--metric accuracy: allowed: test_accuracy"),
    (["--set", "optimizer.lr=choice(0.1, 1)", "--samples", "0"], "--samples 0: must be >= 1"),
    (["--set", "optimizer.lr=choice(0.1, 1)", "--reduction-factor", "1"], "--reduction-factor 1.0: must be > 1"),
])
def test_mistakes_fail_before_any_trial(tmp_path, args, message):
    sweep_dir = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", *SHORT, *args, "--sweep-dir", str(sweep_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not sweep_dir.exists()


def test_a_used_sweep_directory_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("a previous sweep")
    result = CliRunner().invoke(app, ["sweep", *SHORT, "--set", "optimizer.lr=choice(0.1, 1)",
                                      "--sweep-dir", str(tmp_path)])
    assert result.exit_code == 2 and "sweep directory exists and is not empty" in result.stderr
    assert os.listdir(tmp_path) == ["old.txt"]


def test_a_sweep_directory_on_object_storage_is_refused_in_one_line():
    result = CliRunner().invoke(app, ["sweep", *SHORT, "--set", "optimizer.lr=choice(0.1, 1)",
                                      "--sweep-dir", "s3://bucket/sweeps/a"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == ("error: --sweep-dir s3://bucket/sweeps/a: a sweep directory is local "
                                     "(Ray Tune keeps its state there); the trials' run directories follow it")


def test_trial_job_takes_the_sampled_values():
    base = config.load_job(None, ["run.eval_every=25", "run.checkpoint_every=7", "run.steps=100"])
    job = sweep.trial_job(base, {"optimizer.lr": 0.3, "optimizer.batch_size": 16}, 0, "/somewhere/trial")
    assert (job.optimizer.lr, job.optimizer.batch_size, job.cluster.workers) == (0.3, 16, 0)
    assert (job.run.run_dir, job.run.checkpoint_every, job.run.seed) == ("/somewhere/trial", 25, base.run.seed)
    assert sweep.evaluations(job, 8000) == 4
    assert sweep.evaluations(config.replace(job, run={"steps": 101}), 8000) == 5  # and the last step


def test_workers_0_trains_in_this_process_like_the_local_backend(tmp_path):
    """run_job without Ray gives the bits of the single-process trainer on one BLAS thread."""
    job = config.load_job(None, ["cluster.workers=0", "run.steps=30", "optimizer.lr=0.1", "run.seed=5",
                                 "run.eval_every=10"], {"run.run_dir": str(tmp_path / "run")})
    lines = []
    summary = driver.run_job(job, echo=lines.append)
    with threadpool_limits(limits=1, user_api="blas"):
        expected = trainer.train(job, trainer.LocalBackend(data.resolve("mnist-sample")))
    got = checkpoint.load(summary["checkpoint"])
    assert got.step == expected.step == summary["steps"] == 30 and summary["workers"] == 0
    assert all(got.params[k].tobytes() == expected.params[k].tobytes() for k in expected.params)
    assert summary["test_accuracy"] == expected.metrics["test_accuracy"]
    assert lines[0].startswith("in this process (no Ray workers) | minibatch lr 0.1")


def asha_stops(values_by_trial, max_t, grace, rf):
    """The evaluation at which ASHA (Li et al. 2020) stops each trial (None: runs to the end) when
    trials run one after another: at a rung (grace * rf^k evaluations), a trial whose value is
    below the (1 - 1/rf) quantile of the values earlier trials had at that rung stops."""
    rungs = {grace * rf ** k: [] for k in range(max_t) if grace * rf ** k <= max_t}
    stops = []
    for values in values_by_trial:
        stop = None
        for evaluation, value in enumerate(values, start=1):
            if evaluation in rungs:
                earlier = rungs[evaluation]
                cut = np.percentile(earlier, 100 * (1 - 1 / rf)) if earlier else None
                earlier.append(value)
                if cut is not None and value < cut:
                    stop = evaluation
                    break
        stops.append(stop)
    return stops


@pytest.mark.slow
def test_sweep_stops_trials_early_and_best_job_gives_the_same_bits(tmp_path):
    """6 trials on mnist-sample, one at a time on the embedded Ray; ASHA's decisions against
    the rule re-derived from the trials' own metrics; best.toml trained again gives the bits
    of the best trial's last checkpoint."""
    sweep_dir, home = tmp_path / "sweep", tmp_path / "home"
    home.mkdir()
    env = os.environ | {"RAY_ADDRESS": "", "HOME": str(home)}
    proc = subprocess.run([DISTMLP, "sweep", "--set", "run.steps=300", "--set", "run.eval_every=50",
                           "--set", "optimizer.lr=loguniform(0.0001, 1)",
                           "--set", "optimizer.batch_size=choice(16, 32, 64)", "--samples", "6",
                           "--reduction-factor", "2", "--max-concurrent", "1", "--sweep-dir", str(sweep_dir),
                           "--json"], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.strip().splitlines()) == 1, "with --json, stdout holds only the summary"
    summary = json.loads(proc.stdout)
    trials = summary["trials"]
    assert len(trials) == 6 and summary["max_evaluations"] == 6
    lrs = [t["params"]["optimizer.lr"] for t in trials]
    assert min(lrs) < 1e-3 and max(lrs) > 0.1, "the seeded draws should span the range"

    # each trial: its own run directory with its sampled values, consistent where it stopped
    by_id = sorted(trials, key=lambda t: t["trial"])  # with --max-concurrent 1 they ran in this order
    values_by_trial = []
    for t in by_id:
        run_dir = sweep_dir / "trials" / t["trial"]
        assert t["run_dir"] == str(run_dir)
        job = config.load_job(run_dir / "job.toml")
        assert (job.optimizer.lr, job.optimizer.batch_size) == (t["params"]["optimizer.lr"],
                                                                t["params"]["optimizer.batch_size"])
        records = metrics.read_jsonl(run_dir / "metrics.jsonl")
        assert records[-1]["step"] == t["step"], "metrics end where the trial stopped"
        evaluated = [r for r in records if r.get("test_accuracy") is not None]
        assert [r["step"] for r in evaluated] == list(range(50, t["step"] + 1, 50))
        assert t["evaluations"] == len(evaluated) and t["test_accuracy"] == evaluated[-1]["test_accuracy"]
        assert checkpoint.pointer(run_dir) == t["checkpoint"]
        assert checkpoint.load(t["checkpoint"]).step == t["step"]
        assert t["status"] == ("completed" if t["step"] == 300 else "early-stopped")
        values_by_trial.append([r["test_accuracy"] for r in evaluated])
    expected = asha_stops(values_by_trial, max_t=6, grace=1, rf=2)
    assert [t["evaluations"] if t["status"] == "early-stopped" else None for t in by_id] == expected
    assert summary["early_stopped"] >= 1 and summary["completed"] >= 1 and summary["errors"] == 0

    # the table (on stderr with --json): a line per trial with its values and status
    for t in trials:
        line = next(x for x in proc.stderr.splitlines() if x.startswith(t["trial"]))
        assert t["status"] in line and f"{t['params']['optimizer.lr']:.4g}" in line and f"{t['step']}/300" in line

    # the best completed trial, its job as best.toml; Tune's files under the sweep, none in ~
    completed = [t for t in trials if t["status"] == "completed"]
    best = max(completed, key=lambda t: t["test_accuracy"])
    assert summary["best"]["trial"] == best["trial"]
    best_toml = sweep_dir / "best.toml"
    assert config.load_job(best_toml) == config.replace(config.load_job(Path(best["run_dir"]) / "job.toml"),
                                                       run={"run_dir": None})
    assert (sweep_dir / "tune").is_dir() and not (home / "ray_results").exists()
    assert json.loads((sweep_dir / "sweep.json").read_text())["trials"] == trials

    again = tmp_path / "again"
    proc = subprocess.run([DISTMLP, "train", str(best_toml), "--run-dir", str(again), "--json"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    retrained = json.loads(proc.stdout.strip().splitlines()[-1])
    assert retrained["workers"] == 0 and retrained["test_accuracy"] == best["test_accuracy"]
    got, want = checkpoint.load(retrained["checkpoint"]), checkpoint.load(best["checkpoint"])
    assert got.step == want.step == 300
    assert all(got.params[k].tobytes() == want.params[k].tobytes() for k in want.params)


@pytest.mark.slow
def test_trials_with_workers_and_a_failing_trial(tmp_path):
    """--workers-per-trial 1: each trial drives a worker actor in the same Ray; a trial that
    diverges is an error row with its one-line reason, and the sweep still ends with best.toml."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([DISTMLP, "sweep", "--set", "run.steps=100", "--set", "run.eval_every=50",
                           "--set", "optimizer.lr=grid(0.3, 1e30)", "--samples", "1", "--workers-per-trial", "1",
                           "--sweep-dir", str(sweep_dir)], capture_output=True, text=True, timeout=900,
                          env=os.environ | {"RAY_ADDRESS": ""}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    good, bad = sorted(summary["trials"], key=lambda t: t["params"]["optimizer.lr"])
    assert (good["status"], good["step"], bad["status"]) == ("completed", 100, "error")
    assert "DivergenceError: non-finite loss or gradient in worker 0" in bad["error"]  # its worker saw it
    assert config.load_job(Path(good["run_dir"]) / "job.toml").cluster.workers == 1
    assert config.load_job(sweep_dir / "best.toml").cluster.workers == 1
    out = proc.stdout.splitlines()
    assert any(line.startswith(good["trial"]) and line.endswith("completed") for line in out), proc.stdout
    assert f"{bad['trial']}: {bad['error']}" in out
    assert f"trial {bad['trial']} failed; its error: {sweep_dir / 'tune' / bad['trial'] / 'error.txt'}" in out
    assert (sweep_dir / "tune" / bad["trial"] / "error.txt").is_file()
