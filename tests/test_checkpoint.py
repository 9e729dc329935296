"""Parquet checkpoints: contents, verification, atomic save, retention, resume helpers, CLI."""

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distmlp import checkpoint, config, data, mlp, trainer
from distmlp.checkpoint import CheckpointError, CheckpointHook
from distmlp.cli import app
from distmlp.sampling import Sampler

runner = CliRunner()


def small_job(**run):
    """784-16-16-10 minibatch job on the bundled sample, a handful of steps."""
    settings = {"steps": 6, "seed": 3} | run
    return config.replace(config.JobConfig(), run=settings)


def momentum_state(job, step=5):
    """A TrainState with non-trivial params, momentum velocities, counters and metrics."""
    rng = np.random.default_rng(step)
    state = trainer.initial_state(job)
    dtype = np.dtype(job.model.dtype)
    state.params = {n: (p + rng.normal(size=p.shape)).astype(dtype) for n, p in state.params.items()}
    state.opt_state = {n: rng.normal(size=p.shape).astype(dtype) for n, p in state.params.items()}
    state.step, state.samples_seen, state.nonfinite_streak = step, 32 * step, 1
    state.metrics = {"step": step, "train_loss": np.float32(0.5), "test_accuracy": 0.25 + step / 100}
    return state


@pytest.fixture(scope="module")
def backend():
    return trainer.LocalBackend(data.resolve("mnist-sample"))


@pytest.fixture
def momentum_job():
    return config.replace(config.JobConfig(), optimizer={"momentum": 0.9}, model={"dtype": "float64"})


def flip_byte(path, offset=None):
    path = Path(path)
    raw = bytearray(path.read_bytes())
    i = len(raw) // 2 if offset is None else offset
    raw[i] ^= 0x01
    path.write_bytes(bytes(raw))


def resign(ckpt_path, name, data_bytes):
    """Replace one file and fix its manifest checksum: a well-formed lie the schema check must catch."""
    (ckpt_path / name).write_bytes(data_bytes)
    manifest = json.loads((ckpt_path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(data_bytes).hexdigest()
    (ckpt_path / "manifest.json").write_text(json.dumps(manifest))


# ------------------------------------------------------------------------ contents


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_exact(tmp_path, dtype):
    job = config.replace(config.JobConfig(), optimizer={"momentum": 0.9}, model={"dtype": dtype},
                         data={"dataset": None, "path": "/some/dir"})
    state = momentum_state(job)
    sampler_state = Sampler("minibatch", 8000, 32, "shuffle", 0).state()
    path = checkpoint.save(tmp_path / "ck", state, job, sampler_state, epoch=0.02)
    ckpt = checkpoint.load(path)
    assert ckpt.job == job
    assert (ckpt.step, ckpt.samples_seen, ckpt.nonfinite_streak, ckpt.epoch) == (5, 160, 1, 0.02)
    assert ckpt.sampler == sampler_state and ckpt.metrics == state.metrics
    assert type(ckpt.metrics["train_loss"]) is float
    for group, arrays in (("params", ckpt.params), ("opt", ckpt.opt_state)):
        expected = state.params if group == "params" else state.opt_state
        assert list(arrays) == ["W1", "b1", "W2", "b2", "W3", "b3"]
        for name, a in arrays.items():
            assert a.dtype == np.dtype(dtype) and a.shape == expected[name].shape
            assert a.tobytes() == expected[name].tobytes()


def test_files_are_plain_parquet_and_json_with_a_sha256_manifest(tmp_path, momentum_job):
    """Read the files with pyarrow/json/hashlib directly: the format is what the docs say."""
    state = momentum_state(momentum_job)
    path = tmp_path / "ck"
    checkpoint.save(path, state, momentum_job)
    assert sorted(os.listdir(path)) == ["job.json", "manifest.json", "optimizer.parquet",
                                        "params.parquet", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "distmlp-checkpoint" and manifest["format_version"] == 1
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((path / name).read_bytes()).hexdigest() == digest
    table = pq.read_table(path / "params.parquet")
    assert table.column_names == ["name", "shape", "dtype", "values"]
    rows = {r["name"]: r for r in table.to_pylist()}
    assert rows["W1"]["shape"] == [16, 784] and rows["b3"]["shape"] == [10]
    assert rows["W2"]["dtype"] == "float64"
    np.testing.assert_array_equal(np.reshape(rows["W2"]["values"], (16, 16)), state.params["W2"])
    velocity = {r["name"]: r for r in pq.read_table(path / "optimizer.parquet").to_pylist()}
    np.testing.assert_array_equal(velocity["b1"]["values"], state.opt_state["b1"])
    assert json.loads((path / "job.json").read_text())["optimizer"]["momentum"] == 0.9
    assert json.loads((path / "state.json").read_text())["step"] == 5


def test_plain_sgd_has_an_empty_optimizer_table(tmp_path):
    job = small_job()
    path = checkpoint.save(tmp_path / "ck", trainer.initial_state(job), job)
    assert pq.read_table(os.path.join(path, "optimizer.parquet")).num_rows == 0
    assert checkpoint.load(path).opt_state == {}


def test_non_finite_arrays_are_refused_and_nothing_is_written(tmp_path, momentum_job):
    state = momentum_state(momentum_job)
    state.opt_state["W2"][3, 4] = np.nan
    with pytest.raises(CheckpointError, match="optimizer state W2 has non-finite values"):
        checkpoint.save(tmp_path / "ck", state, momentum_job)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------- verification


@pytest.mark.parametrize("name", checkpoint.FILES)
def test_flipped_byte_in_any_file_names_the_file_and_the_checksum(tmp_path, momentum_job, name):
    path = tmp_path / "ck"
    checkpoint.save(path, momentum_state(momentum_job), momentum_job)
    flip_byte(path / name)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert str(path / name) in str(e.value) and "checksum mismatch" in str(e.value)


def test_flipped_byte_in_the_manifest_is_caught(tmp_path, momentum_job):
    path = tmp_path / "ck"
    checkpoint.save(path, momentum_state(momentum_job), momentum_job)
    text = (path / "manifest.json").read_text()
    digest = json.loads(text)["files"]["params.parquet"]
    (path / "manifest.json").write_text(text.replace(digest, ("0" if digest[0] != "0" else "1") + digest[1:]))
    with pytest.raises(CheckpointError, match=r"params\.parquet: checksum mismatch"):
        checkpoint.load(path)


def params_table(arrays, **replace):
    columns = {"name": list(arrays), "shape": [list(a.shape) for a in arrays.values()],
               "dtype": [a.dtype.name for a in arrays.values()],
               "values": [a.astype(np.float64).ravel() for a in arrays.values()]} | replace
    types = {f.name: f.type for f in checkpoint.ARRAY_SCHEMA}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({k: pa.array(v, types.get(k)) for k, v in columns.items()}), sink)
    return sink.getvalue().to_pybytes()


def test_schema_shapes_and_dtypes_are_checked_after_the_checksums(tmp_path):
    job = small_job()
    path = tmp_path / "ck"
    params = trainer.initial_state(job).params
    cases = [
        (params_table(params, extra=[1] * 6), r"columns \(name: string.*extra: int64\), expected"),
        (params_table(params, shape=[[1, 2]] * 6), "W1 has 12544 values for shape"),
        (params_table(params, dtype=["float16"] * 6), "dtype 'float16'"),
        (params_table(params, dtype=["float64"] * 6), "W1 is float64, the job's model.dtype is float32"),
        (params_table({n: params[n] for n in ("W1", "b1", "W2", "b2")}),
         r"arrays \['W1', 'b1', 'W2', 'b2'\], expected \['W1', 'b1', 'W2', 'b2', 'W3', 'b3'\]"),
        (params_table(mlp.init_params((784, 32, 16, 10), np.random.default_rng(0))),
         r"W1 has shape \[32, 784\], expected \[16, 784\] for model.sizes \[784, 16, 16, 10\]"),
        (b"PAR1 not really", "not a readable Parquet file"),
    ]
    for payload, message in cases:
        checkpoint.save(path, trainer.initial_state(job), job)
        resign(path, "params.parquet", payload)
        with pytest.raises(CheckpointError, match=message) as e:
            checkpoint.load(path)
        assert str(path / "params.parquet") in str(e.value)


@pytest.mark.slow
def test_a_tiny_parquet_that_decodes_to_megabytes_is_refused_from_its_metadata(tmp_path):
    """A re-signed params.parquet of a few KB holding 8M run-length encoded zeros (64 MB as
    float64): load, in a subprocess, refuses it before Arrow allocates 8 MB (it was 100 MB)."""
    job = small_job()
    path = Path(checkpoint.save(tmp_path / "ck", trainer.initial_state(job), job))
    bomb = params_table({"W1": np.zeros(8_000_000)}, dtype=["float32"])
    assert len(bomb) < 4096
    resign(path, "params.parquet", bomb)
    script = ("import sys\nimport pyarrow as pa\nfrom distmlp import checkpoint\n"
              "try:\n    checkpoint.load(sys.argv[1])\nexcept checkpoint.CheckpointError as e:\n    print(e)\n"
              "print(pa.default_memory_pool().max_memory())\n")
    proc = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    error, arrow_peak = proc.stdout.splitlines()
    sizes = job.model.sizes
    allowed = 4 * (sum(n_in * n_out + n_out for n_in, n_out in zip(sizes, sizes[1:])) + 5 * 6)
    assert re.fullmatch(rf"{re.escape(str(path / 'params.parquet'))}: 1 rows of 8000003 values \(\d+ bytes "
                        rf"uncompressed\); the job's model.sizes allow at most 24 rows of {allowed} values.*", error)
    assert int(arrow_peak) < 8 * 2 ** 20


def test_state_job_and_manifest_contents_are_checked(tmp_path, momentum_job):
    path = tmp_path / "ck"
    state_json = {"step": 5, "epoch": 0.5, "samples_seen": 160, "nonfinite_streak": 0, "sampler": None,
                  "metrics": {}}
    cases = [
        ("state.json", json.dumps(state_json | {"extra": 1}), "keys .* expected"),
        ("state.json", json.dumps(state_json | {"step": -1}), "step = -1"),
        ("state.json", json.dumps(state_json | {"step": "5"}), "step = '5'"),
        ("state.json", "[1, 2]", "expected a JSON object"),
        ("job.json", json.dumps({"model": {"sizes": [784, 10], "colour": "red"}}), "model.colour: unknown key"),
        ("optimizer.parquet", params_table({}), None),  # momentum job without velocities
    ]
    for name, text, message in cases:
        checkpoint.save(path, momentum_state(momentum_job), momentum_job)
        resign(path, name, text.encode() if isinstance(text, str) else text)
        with pytest.raises(CheckpointError, match=message or r"arrays \[\], expected") as e:
            checkpoint.load(path)
        assert str(path / name) in str(e.value)
    checkpoint.save(path, momentum_state(momentum_job), momentum_job)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 2}))
    with pytest.raises(CheckpointError, match="format_version 2, this distmlp reads version 1"):
        checkpoint.load(path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "state.json").unlink()
    with pytest.raises(CheckpointError, match=r"state\.json: missing"):
        checkpoint.load(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        checkpoint.load(path)


# -------------------------------------------------------------------------- atomicity


def failing_rename(real_rename):
    """os.rename that fails when it would move a temporary directory into place."""
    def rename(src, dst):
        if os.path.basename(str(src)).startswith(".tmp-") and not os.path.basename(str(dst)).startswith(".tmp-"):
            raise OSError(28, "No space left on device (simulated)")
        return real_rename(src, dst)
    return rename


def test_failed_rename_leaves_the_previous_checkpoint_and_no_half_directory(tmp_path, monkeypatch, momentum_job):
    run_dir = tmp_path / "run"
    first = checkpoint.save_in_run(run_dir, momentum_state(momentum_job, step=2), momentum_job)
    before = sorted(os.listdir(run_dir / "checkpoints"))
    monkeypatch.setattr(os, "rename", failing_rename(os.rename))
    with pytest.raises(CheckpointError, match="step-000004: cannot write checkpoint: .*No space left"):
        checkpoint.save_in_run(run_dir, momentum_state(momentum_job, step=4), momentum_job)
    assert sorted(os.listdir(run_dir / "checkpoints")) == before
    assert checkpoint.pointer(run_dir) == first
    path, ckpt = checkpoint.latest_valid(run_dir)
    assert path == first and ckpt.step == 2


def test_failed_rename_over_an_existing_checkpoint_keeps_it(tmp_path, monkeypatch, momentum_job):
    path = tmp_path / "ck"
    checkpoint.save(path, momentum_state(momentum_job, step=2), momentum_job)
    monkeypatch.setattr(os, "rename", failing_rename(os.rename))
    with pytest.raises(CheckpointError, match="cannot write checkpoint"):
        checkpoint.save(path, momentum_state(momentum_job, step=4), momentum_job)
    assert os.listdir(tmp_path) == ["ck"]
    assert checkpoint.load(path).step == 2


class Crash(BaseException):
    """Stands for the process dying: nothing catches it."""


@pytest.mark.parametrize("crash_at", ["second rename", "removing the old copy"])
def test_a_crash_while_replacing_a_checkpoint_loses_neither(tmp_path, monkeypatch, momentum_job, crash_at):
    """save_in_run over an existing step-4 dies between its two renames (the old checkpoint is
    only aside) or after them (the new one is in place); the next start's cleanup keeps a
    loadable step-4: the old one or the new one."""
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    path = checkpoint.save_in_run(run_dir, momentum_state(momentum_job, step=4), momentum_job)
    old = checkpoint.load(path).params
    new = momentum_state(momentum_job, step=4)
    new.params = {n: p + 1 for n, p in new.params.items()}
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def rename(src, dst):
        if crash_at == "second rename" and os.path.basename(str(src)).startswith(".tmp-"):
            raise Crash()
        return real_rename(src, dst)

    def rmtree(target, *args, **kwargs):
        if crash_at == "removing the old copy" and os.path.basename(str(target)).startswith(".old-") \
                and os.path.exists(target):
            raise Crash()
        return real_rmtree(target, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    with pytest.raises(Crash):
        checkpoint.save_in_run(run_dir, new, momentum_job)
    monkeypatch.undo()
    expected = old if crash_at == "second rename" else new.params
    assert os.path.exists(path) == (crash_at != "second rename")
    for _ in range(2):  # resume finds it before the cleanup (under its aside name) and after it
        found, ckpt = checkpoint.latest_valid(run_dir)
        assert ckpt.step == 4 and all(ckpt.params[n].tobytes() == a.tobytes() for n, a in expected.items())
        checkpoint.clean_leftovers(ckpt_dir)  # what CheckpointHook.on_start does first
    assert found == path
    assert sorted(os.listdir(ckpt_dir)) == ["best", "latest", "step-000004"]


def test_replacing_a_checkpoint_and_refusing_to_replace_other_directories(tmp_path, momentum_job):
    path = tmp_path / "ck"
    checkpoint.save(path, momentum_state(momentum_job, step=2), momentum_job)
    checkpoint.save(path, momentum_state(momentum_job, step=4), momentum_job)
    assert checkpoint.load(path).step == 4 and os.listdir(tmp_path) == ["ck"]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not a checkpoint"):
        checkpoint.save(precious, momentum_state(momentum_job), momentum_job)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_crash_leftovers_are_ignored_on_load_and_cleaned_by_the_next_save(tmp_path, momentum_job):
    run_dir = tmp_path / "run"
    checkpoint.save_in_run(run_dir, momentum_state(momentum_job, step=2), momentum_job)
    half = run_dir / "checkpoints" / ".tmp-step-000004-abc123"  # what a kill during save leaves
    half.mkdir()
    (half / "params.parquet").write_bytes(b"PAR1 half")
    assert checkpoint.latest_valid(run_dir)[1].step == 2
    checkpoint.save_in_run(run_dir, momentum_state(momentum_job, step=4), momentum_job)
    assert not half.exists()
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["best", "latest", "step-000002", "step-000004"]


# -------------------------------------------------------------------- run directories


def test_retention_keeps_the_last_n_and_the_best(tmp_path, momentum_job):
    run_dir = tmp_path / "run"
    accuracy = {2: 0.5, 4: 0.9, 6: 0.6, 8: 0.7, 10: 0.8, 12: 0.85}
    for step, acc in accuracy.items():
        state = momentum_state(momentum_job, step)
        state.metrics = {"step": step, "test_accuracy": acc}
        checkpoint.save_in_run(run_dir, state, momentum_job, keep_last=2)
    names = sorted(os.listdir(run_dir / "checkpoints"))
    assert names == ["best", "latest", "step-000004", "step-000010", "step-000012"]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step-000012\n"
    assert (run_dir / "checkpoints" / "best").read_text() == "step-000004\n"
    assert checkpoint.pointer(run_dir, "best") == str(run_dir / "checkpoints" / "step-000004")


def test_hook_saves_every_n_steps_and_the_end(tmp_path, backend):
    job = small_job(steps=7, checkpoint_every=3, keep_last=5, eval_every=3)
    hook = CheckpointHook(tmp_path / "run", job)
    final = trainer.train(job, backend, hooks=[hook])
    steps = [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")]
    assert steps == [3, 6, 7]
    assert hook.last_path == str(tmp_path / "run" / "checkpoints" / "step-000007")
    ckpt = checkpoint.load(hook.last_path)
    assert ckpt.sampler == trainer.make_sampler(job, backend.n_train).state()
    assert ckpt.epoch == 7 / 250 and ckpt.samples_seen == 7 * 32
    assert ckpt.metrics == final.metrics and "test_accuracy" in ckpt.metrics
    for name, p in final.params.items():
        assert ckpt.params[name].tobytes() == p.tobytes()


def test_hook_with_every_zero_saves_only_the_end_once(tmp_path, backend):
    job = small_job(steps=4)
    hook = CheckpointHook(tmp_path / "run", job, every=0, keep_last=3)
    trainer.train(job, backend, hooks=[hook])
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "run" / "checkpoints")] == [4]


@pytest.mark.parametrize("optimizer", [{"name": "minibatch", "momentum": 0.9}, {"name": "sgd"},
                                       {"name": "gd", "lr": 0.5}])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, backend, optimizer):
    """In-process resume: train 3 steps, load the checkpoint, train to 7; same bits as 7 straight."""
    job = config.replace(small_job(steps=7, checkpoint_every=3), optimizer=optimizer)
    straight = trainer.train(job, backend)
    trainer.train(config.replace(job, run={"steps": 3}), backend, hooks=[CheckpointHook(tmp_path, job)])
    _, ckpt = checkpoint.latest_valid(tmp_path)
    assert ckpt.step == 3
    checkpoint.check_sampler(ckpt, trainer.make_sampler(ckpt.job, backend.n_train))
    resumed = trainer.train(ckpt.job, backend, checkpoint.to_train_state(ckpt))
    assert resumed.step == 7 and resumed.samples_seen == straight.samples_seen
    for name, p in straight.params.items():
        assert resumed.params[name].tobytes() == p.tobytes()
    for name, v in straight.opt_state.items():
        assert resumed.opt_state[name].tobytes() == v.tobytes()


def test_sampler_mismatch_is_refused(tmp_path, momentum_job):
    sampler = Sampler("minibatch", 8000, 32, "shuffle", seed=0)
    path = checkpoint.save(tmp_path / "ck", momentum_state(momentum_job), momentum_job, sampler.state())
    ckpt = checkpoint.load(path)
    checkpoint.check_sampler(ckpt, sampler)
    with pytest.raises(CheckpointError, match="sampler state .* does not match"):
        checkpoint.check_sampler(ckpt, Sampler("minibatch", 8000, 32, "shuffle", seed=1))


def test_latest_valid_falls_back_with_a_warning_naming_the_file(tmp_path, momentum_job, caplog):
    for step in (2, 4, 6):
        checkpoint.save_in_run(tmp_path, momentum_state(momentum_job, step), momentum_job)
    bad = tmp_path / "checkpoints" / "step-000006" / "params.parquet"
    flip_byte(bad)
    with caplog.at_level(logging.WARNING, logger="distmlp.checkpoint"):
        path, ckpt = checkpoint.latest_valid(tmp_path)
    assert ckpt.step == 4 and path.endswith("step-000004")
    [message] = [r.getMessage() for r in caplog.records]
    assert str(bad) in message and "checksum mismatch" in message and "falling back" in message
    assert "\n" not in message
    for step in (2, 4):
        flip_byte(tmp_path / "checkpoints" / f"step-{step:06d}" / "state.json")
    with pytest.raises(CheckpointError, match="no valid checkpoint; newest failure: .*step-000006"):
        checkpoint.latest_valid(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoints"):
        checkpoint.latest_valid(tmp_path / "elsewhere")


@pytest.mark.slow
def test_an_integer_past_the_digit_limit_falls_back_to_the_previous_checkpoint(tmp_path, momentum_job):
    """A re-signed state.json whose step has 5000 digits (int() refuses over 4300): in a
    subprocess, `checkpoint inspect RUN_DIR` warns about it and verifies the previous one."""
    for step in (2, 4):
        checkpoint.save_in_run(tmp_path, momentum_state(momentum_job, step), momentum_job)
    bad = tmp_path / "checkpoints" / "step-000004" / "state.json"
    resign(bad.parent, "state.json", re.sub(rb'"step": 4', b'"step": 1' + b"0" * 4999, bad.read_bytes()))
    proc = subprocess.run([str(Path(sys.executable).with_name("distmlp")), "checkpoint", "inspect", str(tmp_path),
                           "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["verified"] and info["step"] == 2 and info["path"].endswith("step-000002")
    [warning] = proc.stderr.splitlines()
    assert f"{bad}: not valid JSON" in warning and "digits" in warning and "falling back" in warning


def test_resolve_accepts_a_checkpoint_or_a_run_directory(tmp_path, momentum_job):
    path = checkpoint.save_in_run(tmp_path / "run", momentum_state(momentum_job), momentum_job)
    assert checkpoint.resolve(path)[0] == path
    assert checkpoint.resolve(tmp_path / "run")[0] == path
    with pytest.raises(CheckpointError, match="neither a checkpoint directory"):
        checkpoint.resolve(tmp_path)


# ----------------------------------------------------------------------------------- CLI


def reference_accuracy(params, x_uint8, labels):
    """Held-out accuracy and mean loss computed here with explicit loops over layers."""
    a = x_uint8.astype(np.float64) / 255.0
    n_layers = len(params) // 2
    for i in range(1, n_layers + 1):
        z = a @ params[f"W{i}"].astype(np.float64).T + params[f"b{i}"]
        a = z if i == n_layers else np.where(z > 0, z, 0.0)
    log_p = a - a.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    return float(np.mean(a.argmax(axis=1) == labels)), float(-log_p[np.arange(len(labels)), labels].mean())


def test_evaluate_json_matches_an_independent_computation(tmp_path, backend):
    job = config.replace(small_job(steps=40), model={"dtype": "float64"})
    trainer.train(job, trainer.LocalBackend(data.resolve("mnist-sample"), np.float64),
                  hooks=[CheckpointHook(tmp_path / "run", job)])
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--dataset", "mnist-sample", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    ckpt = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-000040")
    accuracy, loss = reference_accuracy(ckpt.params, backend.test_x, backend.test_y)
    assert got["n"] == 2000
    assert got["test_accuracy"] == accuracy
    assert got["test_loss"] == pytest.approx(loss, rel=1e-12)
    text = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--dataset", "mnist-sample"])
    assert text.exit_code == 0 and f"held-out accuracy {accuracy:.2%}" in text.stdout


def test_evaluate_errors_are_one_line(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--dataset", "mnist-sample"])
    assert result.exit_code == 2 and "neither a checkpoint directory" in result.stderr
    job = config.replace(small_job(), model={"sizes": [100, 10]})
    path = checkpoint.save(tmp_path / "ck", trainer.initial_state(job), job)
    result = runner.invoke(app, ["evaluate", path, "--dataset", "mnist-sample"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: mnist-sample: images have 784 pixels, the model takes 100 inputs"
    result = runner.invoke(app, ["evaluate", path])
    assert result.exit_code == 2 and "give --data DIR or --dataset NAME" in result.stderr


def test_inspect_shows_verification_step_layers_metrics_config(tmp_path, momentum_job):
    path = checkpoint.save_in_run(tmp_path / "run", momentum_state(momentum_job, 5), momentum_job)
    result = runner.invoke(app, ["checkpoint", "inspect", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"checkpoint {path}" in out and "verified  yes" in out and "step      5 " in out
    assert "784-16-16-10 float64" in out and "test_accuracy 0.3" in out and "momentum = 0.9" in out
    info = json.loads(runner.invoke(app, ["checkpoint", "inspect", path, "--json"]).stdout)
    assert info["verified"] and info["step"] == 5 and info["sizes"] == [784, 16, 16, 10]
    assert info["config"]["optimizer"]["momentum"] == 0.9
    flip_byte(os.path.join(path, "optimizer.parquet"))
    result = runner.invoke(app, ["checkpoint", "inspect", path])
    assert result.exit_code == 2
    assert "verified  NO" in result.stdout and "optimizer.parquet: checksum mismatch" in result.stdout


def test_cli_export_import_round_trip(tmp_path, momentum_job):
    path = checkpoint.save(tmp_path / "ck", momentum_state(momentum_job), momentum_job)
    pkl = tmp_path / "weights_biases.pkl"
    result = runner.invoke(app, ["checkpoint", "export", path, "--format", "seed-pickle", "-o", str(pkl)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    back = checkpoint.resolve(tmp_path / "back")[1]
    assert back.step == 0 and back.opt_state == {} and back.job.model.dtype == "float64"
    for name, p in checkpoint.load(path).params.items():
        assert back.params[name].tobytes() == p.tobytes()
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "b32"), "--dtype", "float32"])
    assert result.exit_code == 0 and checkpoint.resolve(tmp_path / "b32")[1].params["W1"].dtype == np.float32
    assert (tmp_path / "back" / "checkpoints" / "latest").read_text() == "step-000000\n"
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "back")])
    assert result.exit_code == 2 and "exists and is not empty; import into a new directory" in result.stderr
    result = runner.invoke(app, ["checkpoint", "export", path, "--format", "onnx", "-o", str(pkl)])
    assert result.exit_code == 2 and "--format 'onnx': allowed: seed-pickle" in result.stderr


def test_cli_import_refuses_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    pkl = tmp_path / "weights_biases.pkl"
    pkl.write_bytes(pickle.dumps({"weights_input_to_hidden1": Evil()}))
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "ck")])
    assert result.exit_code == 2
    assert "forbidden global" in result.stderr and "system" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "ck").exists()
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "ck"), "--trust-pickle"])
    assert marker.exists()  # trusted: the file's code ran, as the user asked
    assert result.exit_code == 2 and "missing keys" in result.stderr


def test_export_refuses_non_seed_layer_sizes(tmp_path):
    job = config.replace(small_job(), model={"sizes": [784, 32, 10]})
    path = checkpoint.save(tmp_path / "ck", trainer.initial_state(job), job)
    result = runner.invoke(app, ["checkpoint", "export", path, "-o", str(tmp_path / "w.pkl")])
    assert result.exit_code == 2
    assert "seed pickle format holds only a 784-16-16-10 model (six keys); this model is 784-32-10" in result.stderr
    assert not (tmp_path / "w.pkl").exists()
