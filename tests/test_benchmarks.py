"""benchmarks/run.py --quick runs every comparison end to end and prints the table (no timing checks)."""

import glob
import importlib.util
import os
import platform
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_quick_benchmark_runs_and_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "comparison" in out and "median" in out
    for row in ("single-process NumPy", "Ray, actor calls", "Ray, shared-memory mesh",
                "speed-up 2 workers vs 1", "2 workers / 1 worker", "seed per-example loop (extrapolated)",
                "PyTorch", "from outside: (long - short run) / steps", "inside: median step_s of metrics.jsonl",
                "one minibatch epoch of 60,000, end to end", "speed-up 2 workers vs 1, end to end"):
        assert row in out, row
    assert "us/step" in out and "s/epoch" in out and "RSS" in out
    assert re.search(r"end to end \(CLI, minibatch 32, 2 workers\) *\| from outside.*\| -?[\d,]+ us/step", out)
    assert re.search(r"jobs/quickstart.toml: from outside *\| -?[\d,]+ us/step *\| inside: median [\d,]+", out)
    assert re.search(r"jobs/quickstart.toml --workers 0: from outside *\| -?[\d,]+ us/step *\| inside: median [\d,]+", out)
    for where in ("alone", "beside an idle embedded Ray"):  # the gd target's peer: plain processes
        assert re.search(rf"peer: 2 plain processes vs 1, {where} *\| [\d.]+x *\| the workers' gd arithmetic", out), where
    if platform.machine() in ("x86_64", "AMD64"):  # the end-to-end target's peer: a bare lockstep pair
        for where in ("alone", "beside an idle embedded Ray"):
            assert re.search(rf"peer: 2 plain processes in lockstep, {where} *\| [\d.]+x *\| wall per step / median", out), where
    else:
        assert re.search(r"peer: 2 plain processes in lockstep *\| skipped", out)
    if importlib.util.find_spec("torch") is not None:
        for row in ("PyTorch, 1 thread", "PyTorch DDP (gloo), 2 processes", "Ray Train TorchTrainer, 2 workers"):
            assert re.search(re.escape(row) + r" *\| [\d,]+ us/step", out), row
        assert "speed-up mesh vs Ray Train" in out and "speed-up mesh vs DDP" in out
    else:
        assert "torch not installed (optional extra 'bench')" in out
    if importlib.util.find_spec("numba") is not None:
        # --quick makes the single-process rows only: the mesh's CLI runs are the 2-worker rows' code
        for kernel, where in (("numpy", "single process"), ("numba", "single process")):
            assert re.search(rf"kernel {kernel} *\| {where} *\| -?[\d,]+ us/step", out), (kernel, where)
    else:
        assert "numba not installed (optional extra 'fast')" in out


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                    reason="the prototype's flags rely on x86's store order (no memory barrier in it)")
def test_runahead_prototype_gives_the_same_bits_as_lockstep():
    """benchmarks.runahead: both ways of stepping end with the same weights in both workers."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.runahead", "--steps", "300", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for mode in ("lockstep", "run-ahead"):
        line = next(line for line in lines if line.startswith(mode))
        assert re.search(r"[\d.]+ us/step", line) and "ranks agree: True" in line, line
    assert "same bits, lockstep and run-ahead: True" in lines


@pytest.mark.slow
def test_quick_multinode_benchmark_runs_on_its_own_cluster_and_stops_it():
    """benchmarks.multinode --quick: a real 3-node Ray on 127.0.0.1, the rows printed (minibatch
    steps, and gd epochs with 1 and 2 workers), and the cluster's directory not left behind."""
    before = set(glob.glob("/tmp/dmb-*"))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.multinode", "--quick"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for workers in (2, 4):
        assert re.search(rf"Ray, actor calls, {workers} workers *\| [\d,]+ us/step *\| ActorTransport", out)
    if importlib.util.find_spec("torch") is not None:
        for workers in (2, 4):
            assert re.search(rf"Ray, collective allgather, {workers} workers *\| [\d,]+ us/step *\| CollectiveTransport", out)
            assert re.search(rf"speed-up collective vs actor calls, {workers} workers *\| [\d.]+x", out)
        assert re.search(r"Ray Train TorchTrainer, 2 workers *\| [\d,]+ us/step", out)
        assert re.search(r"speed-up collective vs Ray Train, 2 workers *\| [\d.]+x", out)
        for workers in (1, 2):
            assert re.search(rf"Ray, collective allgather, {workers} worker\(s\) *\| [\d.]+ s/epoch *\| CollectiveTransport", out)
        assert re.search(r"speed-up 2 workers on 2 nodes vs 1 *\| [\d.]+x", out)
    else:
        assert "torch not installed (optional extra 'bench')" in out
    assert set(glob.glob("/tmp/dmb-*")) == before, "the cluster's directory was left behind"
