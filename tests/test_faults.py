"""Lose workers for real (SIGKILL, SIGSTOP) and the driver; the weights come out bit-identical.

Each fault is injected by a training hook (it runs in the driver between steps) or by a timer
thread, against the worker pids in backend.group.worker_info. The reference is an unfailed run of
the same job (same seed and worker count) in the same Ray: recomputing a step is a pure
function of (weights, indices), so a recovered run must match it bit for bit.
"""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import ray.cloudpickle
from typer.testing import CliRunner

from distmlp import checkpoint, config, data, driver, trainer, transport
from distmlp.cli import app
from distmlp.worker import ShardWorker
from hooks import AtStep, alive, kill
from test_resume import descendants, distmlp_cmd, env

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests/

STEPS = {"gd": 6, "minibatch": 10}


def job_for(optimizer, **cluster):
    job = config.load_job(None, [f'optimizer.name="{optimizer}"', "optimizer.lr=0.1", "run.seed=5",
                                 f"run.steps={STEPS[optimizer]}", "cluster.workers=2",
                                 "cluster.cpus_per_worker=0.5"])
    return config.replace(job, cluster=cluster) if cluster else job


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


@pytest.fixture(scope="module")
def reference(ray_session, source):
    """{optimizer: final TrainState} of unfailed runs."""
    return {name: run(job_for(name), source)[0] for name in STEPS}


def run(job, source, hooks=(), worker_cls=None):
    """(final state, backend) of job on RayBackend with extra hooks that get the backend."""
    backend = transport.start(source, job, **({"worker_cls": worker_cls} if worker_cls else {}))
    try:
        return trainer.train(job, backend, hooks=[h(backend) for h in hooks]), backend
    finally:
        backend.close()


def assert_bit_identical(a, b):
    assert a.step == b.step
    for name in b.params:
        assert a.params[name].tobytes() == b.params[name].tobytes(), name


class SlowAtStep(ShardWorker):
    """Rank 1 takes 1.5 s over step index 3, so a kill can land in the middle of it."""

    def grad_sums(self, params, local_indices, step, shared=None):
        if self.rank == 1 and step == 3:
            time.sleep(1.5)
        return super().grad_sums(params, local_indices, step, shared)


SlowRemote = ray.remote(SlowAtStep)


def kill_later(rank, delay_s, log):
    """Action: SIGKILL worker rank delay_s from now, from a timer thread (mid-step)."""
    def action(backend):
        pid = backend.group.worker_info[rank]["pid"]
        timer = threading.Timer(delay_s, lambda: (os.kill(pid, signal.SIGKILL), log.append(pid)))
        timer.start()
    return action


# ---------------------------------------------------------------------------- worker loss


def test_sigkill_mid_step_restarts_the_worker_and_ends_bit_identical(ray_session, source, reference, caplog):
    """gd: worker 1 is SIGKILLed 0.3 s into step 4 (it sleeps 1.5 s there); worker 0 has answered."""
    killed = []
    with caplog.at_level(logging.WARNING, logger="distmlp"):
        state, backend = run(job_for("gd"), source, [AtStep(3, kill_later(1, 0.3, killed))], SlowRemote)
    assert len(killed) == 1 and not alive(killed[0])
    assert backend.group.failures == 1
    assert backend.group.worker_info[1]["pid"] != killed[0]
    warnings = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert len(warnings) == 1 and f"worker 1 (pid {killed[0]}" in warnings[0] and "died during step 4" in warnings[0]
    assert_bit_identical(state, reference["gd"])


@pytest.mark.parametrize("rank, kind", [(0, "actors"), (1, "mesh")])
def test_sigkill_between_minibatch_steps_is_seen_and_recomputed(ray_session, source, reference, rank, kind):
    """minibatch: the kill lands between steps 5 and 6; step 6 fails, is recomputed, nothing lost."""
    killed = []
    state, backend = run(job_for("minibatch", transport=kind), source, [AtStep(5, kill(rank, log=killed))])
    assert backend.group.failures == 1 and backend.group.worker_info[rank]["pid"] != killed[0][0]
    assert_bit_identical(state, reference["minibatch"])


def test_unlimited_budget_survives_more_kills_than_the_default(ray_session, source, reference):
    kills = [AtStep(step, kill(step % 2)) for step in (1, 2, 3, 4)]
    state, backend = run(job_for("gd", max_failures=-1), source, kills)
    assert backend.group.failures == 4
    assert_bit_identical(state, reference["gd"])


def test_spent_budget_stops_within_30s_naming_worker_step_count_and_checkpoint(ray_session, tmp_path, monkeypatch):
    """Through the CLI: max_failures=1, kills after steps 3 and 5; the second one ends the run."""
    killed = []
    real_train = trainer.train

    def train_with_kills(job, backend, state, hooks):
        kills = [AtStep(3, kill(0, log=killed))(backend), AtStep(5, kill(1, log=killed))(backend)]
        return real_train(job, backend, state, [*hooks, *kills])

    monkeypatch.setattr(driver.trainer, "train", train_with_kills)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--optimizer", "gd", "--steps", "8", "--workers", "2",
                                      "--set", "cluster.cpus_per_worker=0.5", "--set", "cluster.max_failures=1",
                                      "--set", "run.checkpoint_every=2", "--run-dir", str(run_dir)])
    stopped = time.perf_counter()
    assert result.exit_code == 3, result.output  # a run that stopped part-way
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    pid = killed[1][0]
    assert last.startswith(f"error: worker 1 (pid {pid} on node ")
    assert "died during step 6: failure 2, cluster.max_failures is 1" in last
    newest = run_dir / "checkpoints" / "step-000004"
    assert f"last good checkpoint {newest} (continue with: distmlp train --resume {run_dir})" in last
    assert stopped - killed[1][1] < 30
    ckpt = checkpoint.load(newest)
    assert ckpt.step == 4 and checkpoint.pointer(run_dir) == str(newest)


# ----------------------------------------------------------------------------- hung worker


def test_sigstop_is_a_timeout_the_worker_is_replaced_and_the_run_bit_identical(ray_session, source, reference):
    stopped = []
    try:
        t0 = time.perf_counter()
        state, backend = run(job_for("gd", step_timeout_s=3.0), source,
                             [AtStep(2, kill(0, signal.SIGSTOP, log=stopped))])
        wall = time.perf_counter() - t0
    finally:
        for pid, _ in stopped:  # nothing left behind, whatever happened
            if alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
    pid = stopped[0][0]
    assert backend.group.failures == 1 and backend.group.worker_info[0]["pid"] != pid
    assert not alive(pid), "the hung worker process was not killed"
    assert_bit_identical(state, reference["gd"])
    print(f"SIGSTOP recovery: run took {wall:.1f} s including the 3 s timeout")


# ----------------------------------------------------------------------------- driver loss


def test_sigkilled_driver_leaves_no_worker_and_resumes_bit_identical(ray_session, source, tmp_path):
    """SIGKILL only the `distmlp train` process (not its group): its workers, raylet and GCS must
    die with it (within 30 s), and --resume must end on the unfailed run's bits.

    Ray's two per-node agents (dashboard, runtime-env) see the raylet gone within 2 s but then
    try to report it to the dead GCS for up to its reconnect timeout (60 s) before exiting, and an
    idle pooled worker can take as long; they hold no shard and no CPU, and are killed at the end
    of the test so nothing is left behind."""
    job_file = tmp_path / "job.toml"
    job_file.write_text('[optimizer]\nname = "minibatch"\nlr = 0.1\n[run]\nseed = 7\nsteps = 300\n'
                        'checkpoint_every = 10\n[cluster]\nworkers = 2\n')
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(distmlp_cmd("train", str(job_file), "--run-dir", str(run_dir)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    tree = []
    try:
        deadline = time.monotonic() + 120
        while newest_step(run_dir) < 20:
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        tree = descendants(proc.pid)
        workers = [pid for pid in tree if b"ShardWorker" in _cmdline(pid)]
        assert len(workers) == 2, "expected the two worker actors below the driver"
        proc.kill()
        killed = time.monotonic()
        proc.wait(timeout=30)
        while any(alive(pid) for pid in workers) and time.monotonic() < killed + 30:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a worker outlived its driver by 30 s"
        workers_gone_s = time.monotonic() - killed
        ray_core = [pid for pid in tree if pid not in workers and not _cmdline(pid).startswith(AGENTS)]
        while any(alive(pid) for pid in ray_core) and time.monotonic() < killed + 30:
            time.sleep(0.05)
        survivors = {pid: _cmdline(pid)[:60] for pid in ray_core if alive(pid)}
        assert survivors == {}, f"processes outlived the killed driver by 30 s: {survivors}"
        killed_at = newest_step(run_dir)
        assert 20 <= killed_at < 300, "the kill did not interrupt training"

        resumed = subprocess.run(distmlp_cmd("train", "--resume", str(run_dir), "--json"), env=env(),
                                 capture_output=True, text=True, timeout=240)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        straight, _ = run(config.load_job(str(job_file), ["cluster.cpus_per_worker=0.5"]), source)
    finally:
        for pid in [proc.pid, *tree]:
            _kill_quietly(pid)
    final = checkpoint.load(checkpoint.pointer(run_dir))
    assert final.step == 300
    assert_bit_identical(checkpoint.to_train_state(final), straight)
    print(f"driver SIGKILL at checkpoint step {killed_at}: workers gone after {workers_gone_s:.1f} s")


def newest_step(run_dir):
    steps = [s for s, p in checkpoint.list_checkpoints(run_dir / "checkpoints") if (p / "manifest.json").exists()]
    return max(steps, default=-1)


# Processes that hold no shard and no CPU and may take up to the GCS reconnect timeout to notice:
# the per-node agents, and idle pooled worker processes (seen once: a `ray::IDLE` alive after 30 s).
AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent", b"ray::IDLE")


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
