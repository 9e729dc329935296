"""Kill a real `distmlp train` process, resume it, and get the uninterrupted run's bits.

Each run is a subprocess with its own embedded Ray (2 workers). The interrupted run is
SIGKILLed (with every process it started) as soon as a checkpoint at step >= KILL_AFTER
exists, so it dies mid-training, possibly mid-save. The uninterrupted run of the same job
runs alongside, since Ray start-up (not the training) is most of each run's time.
"""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import seed_reference as seed
from hooks import alive
from distmlp import checkpoint, data, trainer

JOBS = {  # optimizer -> (steps, checkpoint_every, workers): long enough to be killed mid-run
    # resuming is the driver's (checkpoint, sampler state, counters): one case kills a run with
    # Ray workers (test_faults kills more), the others train in one process and start no Ray
    "sgd": (6000, 50, 0),
    "minibatch": (300, 10, 2),
    "gd": (300, 10, 0),
}
KILL_AFTER = 20  # kill once a checkpoint at this step or later is on disk
RUN_TIMEOUT_S = 240


def write_job(path, optimizer):
    steps, every, workers = JOBS[optimizer]
    path.write_text(f"""
[optimizer]
name = "{optimizer}"
[data]
dataset = "mnist-sample"
[run]
seed = 11
steps = {steps}
checkpoint_every = {every}
keep_last = 3
[cluster]
workers = {workers}
""")
    return path


def distmlp_cmd(*args):
    script = Path(sys.executable).with_name("distmlp")
    return [str(script), *args]


def env():
    # "local": start an embedded Ray even if another one (e.g. `ray start`) runs on this machine
    return os.environ | {"RAY_ADDRESS": "local", "RAY_USAGE_STATS_ENABLED": "0"}


def start(*args):
    """Start `distmlp ...` in its own session (so it and all it starts can be killed)."""
    return subprocess.Popen(distmlp_cmd(*args), env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(proc):
    """Wait for a started command; (stdout's last line parsed as --json's summary, stderr)."""
    out, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.splitlines()[-1]), err


def newest_step(run_dir):
    steps = [s for s, p in checkpoint.list_checkpoints(run_dir / "checkpoints") if (p / "manifest.json").exists()]
    return max(steps, default=-1)


def descendants(pid):
    """Pids of every live process below pid (read from /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc):
    """SIGKILL proc, its process group and every process below it; wait until none is left."""
    tree = descendants(proc.pid) if proc.poll() is None else []
    if tree or proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, f"processes survived SIGKILL: {[p for p in tree if alive(p)]}"
        time.sleep(0.05)


def kill_after_checkpoint(job_file, run_dir):
    """Start training; SIGKILL it and all it started once a checkpoint >= KILL_AFTER exists."""
    proc = start("train", str(job_file), "--run-dir", str(run_dir))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while newest_step(run_dir) < KILL_AFTER:
            assert proc.poll() is None, "training ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.005)
    finally:
        kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL


def flip_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def assert_same_bits(a, b):
    assert (a.step, a.samples_seen) == (b.step, b.samples_seen)
    for group in ("params", "opt_state"):
        x, y = getattr(a, group), getattr(b, group)
        assert list(x) == list(y)
        for name in x:
            assert x[name].dtype == y[name].dtype
            assert x[name].tobytes() == y[name].tobytes(), f"{group} {name} differs"


@pytest.mark.parametrize("optimizer,corrupt", [("sgd", False), ("minibatch", False), ("gd", True)],
                         ids=["sgd", "minibatch", "gd-flipped-byte"])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, optimizer, corrupt):
    """Uninterrupted run (in parallel) vs killed + resumed; with corrupt, the newest checkpoint
    of the killed run gets one flipped byte and --resume must fall back to the one before."""
    steps, every, _ = JOBS[optimizer]
    job_file = write_job(tmp_path / "job.toml", optimizer)
    straight_proc = start("train", str(job_file), "--run-dir", str(tmp_path / "straight"), "--json")
    try:
        run_dir = tmp_path / "run"
        kill_after_checkpoint(job_file, run_dir)
        killed_at = newest_step(run_dir)
        assert KILL_AFTER <= killed_at < steps, "the kill did not interrupt training"
        if corrupt:
            bad = run_dir / "checkpoints" / checkpoint.step_name(killed_at) / "params.parquet"
            flip_byte(bad)
        summary, err = finish(start("train", "--resume", str(run_dir), "--json"))
        straight_summary, _ = finish(straight_proc)
    finally:
        kill_tree(straight_proc)

    warnings = [line for line in err.splitlines() if "checksum mismatch" in line]
    if corrupt:
        assert len(warnings) == 1, err[-3000:]
        assert str(bad) in warnings[0] and "falling back" in warnings[0]
        assert checkpoint.step_name(killed_at - every) in warnings[0]
    else:
        assert warnings == []
    assert summary["steps"] == straight_summary["steps"] == steps
    resumed, straight = checkpoint.load(summary["checkpoint"]), checkpoint.load(straight_summary["checkpoint"])
    assert resumed.step == steps
    assert_same_bits(resumed, straight)



def test_imported_seed_pickle_trains_on_with_resume(tmp_path):
    """`checkpoint import` makes a run directory that `train --resume` continues from step 0."""
    (tmp_path / "weights_biases.pkl").write_bytes(pickle.dumps(seed.fresh_weights_biases(random.Random(3))))
    (tmp_path / "job.toml").write_text("[optimizer]\nlr = 0.1\n[run]\nsteps = 5\n[cluster]\nworkers = 2\n")
    imported = subprocess.run(distmlp_cmd("checkpoint", "import", str(tmp_path / "weights_biases.pkl"),
                                          "-o", str(tmp_path / "run"), "--job", str(tmp_path / "job.toml")),
                              env=env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert imported.returncode == 0, imported.stderr
    _, start_ckpt = checkpoint.resolve(tmp_path / "run")
    assert start_ckpt.step == 0 and start_ckpt.job.model.dtype == "float64"

    summary, _ = finish(start("train", "--resume", str(tmp_path / "run"), "--json"))
    assert summary["steps"] == 5
    resumed = checkpoint.load(summary["checkpoint"])
    local = trainer.train(start_ckpt.job, trainer.LocalBackend(data.resolve("mnist-sample"), np.float64),
                          checkpoint.to_train_state(start_ckpt))
    assert not np.array_equal(local.params["W1"], start_ckpt.params["W1"])
    for name, p in local.params.items():  # 2 workers sum in another order: equal to rounding
        np.testing.assert_allclose(resumed.params[name], p, rtol=1e-9, atol=1e-12)
