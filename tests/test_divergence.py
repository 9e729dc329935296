"""Divergence: a NaN injected into one worker's gradient, and a learning rate of 1e6.

The default policy stops the run at that step with a DivergenceError naming the step, the
worker and the last good checkpoint; on_nonfinite = "skip" drops the update and stops at the
third non-finite step in a row. (The checkpoint writer's refusal of non-finite arrays is
tested in test_checkpoint.py::test_non_finite_arrays_are_refused_and_nothing_is_written.)
"""

import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
from typer.testing import CliRunner

from distmlp import checkpoint, config, data, driver, trainer, transport
from distmlp.cli import app
from distmlp.worker import ShardWorker

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests/


def nan_worker(rank, steps):
    """A worker class whose rank puts a NaN into W2's gradient at the given 0-based steps."""
    class NaNAt(ShardWorker):
        def grad_sums(self, params, local_indices, step, shared=None):
            out = super().grad_sums(params, local_indices, step, shared)
            if self.rank == rank and step in steps:
                out[1]["W2"][0, 0] = np.nan
            return out
    return ray.remote(NaNAt)


def job_for(steps, **run):
    job = config.load_job(None, ['optimizer.name="gd"', "optimizer.lr=0.1", "run.seed=2", f"run.steps={steps}",
                                 "cluster.workers=2", "cluster.cpus_per_worker=0.5"])
    return config.replace(job, run=run) if run else job


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


def run(job, source, worker_cls=None):
    backend = transport.start(source, job, **({"worker_cls": worker_cls} if worker_cls else {}))
    try:
        return trainer.train(job, backend)
    finally:
        backend.close()


def test_nan_in_one_worker_stops_at_that_step_naming_worker_and_checkpoint(ray_session, source, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(transport, "start", functools.partial(transport.start, worker_cls=nan_worker(1, {3})))
    run_dir = tmp_path / "run"
    job = job_for(6, checkpoint_every=1, run_dir=str(run_dir))
    with pytest.raises(trainer.DivergenceError) as info:
        driver.run_job(job, echo=lambda line: None)
    message = str(info.value)
    last_good = run_dir / "checkpoints" / "step-000003"
    assert re.fullmatch(rf"non-finite loss or gradient in worker 1 \(pid \d+\) at step 4; last good checkpoint "
                        rf"{re.escape(str(last_good))} \(continue with: distmlp train --resume "
                        rf"{re.escape(str(run_dir))}\)", message), message
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [1, 2, 3]
    monkeypatch.undo()
    unfailed = run(job_for(3), source)
    saved = checkpoint.load(last_good)
    for name, p in unfailed.params.items():  # the checkpoint is the clean run's step 3, bit for bit
        assert saved.params[name].tobytes() == p.tobytes(), name


def test_skip_policy_drops_the_poisoned_update(ray_session, source):
    """gd sees the whole set every step, so 6 steps with step 3 skipped equal 5 clean steps."""
    skipped = run(job_for(6, on_nonfinite="skip"), source, nan_worker(0, {2}))
    clean = run(job_for(5), source)
    assert skipped.step == 6 and skipped.nonfinite_streak == 0
    for name, p in clean.params.items():
        assert skipped.params[name].tobytes() == p.tobytes(), name


def test_skip_policy_stops_at_the_third_in_a_row(ray_session, source):
    with pytest.raises(trainer.DivergenceError, match=r"in worker 1 \(pid \d+\) at step 5 \(3 in a row"):
        run(job_for(8, on_nonfinite="skip"), source, nan_worker(1, {2, 3, 4}))


@pytest.mark.parametrize("policy, stop_step, last_good", [("stop", 3, 2), ("skip", 5, 4)])
def test_lr_1e6_from_the_cli_is_one_line_exit_2(ray_session, tmp_path, policy, stop_step, last_good):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--optimizer", "gd", "--lr", "1e6", "--steps", "8", "--workers", "2",
                                      "--set", "cluster.cpus_per_worker=0.5", "--set", "run.checkpoint_every=1",
                                      "--set", f"run.on_nonfinite={policy}", "--run-dir", str(run_dir)])
    assert result.exit_code == 3, result.output  # a run that stopped part-way
    assert "Traceback" not in result.output + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(rf"error: non-finite loss or gradient in worker \d \(pid \d+\) at step {stop_step}\b", lines[0])
    newest = run_dir / "checkpoints" / checkpoint.step_name(last_good)
    assert f"last good checkpoint {newest} " in lines[0]
    ckpt = checkpoint.load(newest)  # loads, and holds only finite values (the writer refuses others)
    assert ckpt.step == last_good and all(np.isfinite(p).all() for p in ckpt.params.values())
    assert checkpoint.pointer(run_dir) == str(newest)


def test_a_diverging_run_in_one_process_says_one_line_without_numpy_warnings(tmp_path):
    """The single-process CLI (a subprocess: stderr as a user sees it) overflows in NumPy at lr
    1e30; the loop reports it in one line, and NumPy's RuntimeWarnings do not come before it."""
    job = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.toml")
    proc = subprocess.run([str(Path(sys.executable).with_name("distmlp")), "train", job, "--lr", "1e30", "--steps", "20",
                           "--workers", "0", "--quiet", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: non-finite loss or gradient at step "), proc.stderr


def test_an_update_that_overflows_the_weights_is_non_finite(source):
    """Finite gradients times lr 1e300 overflow float32 weights: stopped at step 1, weights kept."""
    backend = trainer.LocalBackend(source)
    job = config.load_job(None, ['optimizer.name="gd"', "optimizer.lr=1e300", "run.steps=2"])
    start = trainer.initial_state(job)
    with np.errstate(over="ignore", invalid="ignore"), pytest.raises(
            trainer.DivergenceError, match=r"^non-finite update \(finite gradient, overflowing weights\) at step 1$"):
        trainer.train(job, backend, start)
    assert all(np.isfinite(p).all() for p in start.params.values())
