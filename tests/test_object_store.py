"""Run directories on object storage: checkpoints, metrics and resume through pyarrow.fs URIs.

The unit tests use file:// URIs, which take the object-store code path (no rename, no append,
manifest last) on the local disk. The slow ones run the CLI against a real S3 API: moto's server
on 127.0.0.1, started by the test.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pyarrow.fs as pafs
import pytest

from distmlp import checkpoint, config, data, driver, metrics, storage, trainer
from distmlp.checkpoint import format as ckpt_format


def _state(step, value):
    params = {"W1": np.full((2, 3), value), "b1": np.full((2,), value)}
    return trainer.TrainState(params=params, opt_state={}, step=step, samples_seen=8 * step,
                              nonfinite_streak=0, metrics={"step": step, "test_accuracy": 0.5})


def _job():
    return config.load_job(None, ["model.sizes=[3, 2]", "model.dtype=\"float64\""])


def test_a_checkpoint_whose_manifest_was_never_written_is_invisible(tmp_path, monkeypatch, caplog):
    run = f"file://{tmp_path}/run"
    job = _job()
    checkpoint.save_in_run(run, _state(10, 1.0), job)

    real_write = storage.write_bytes

    def crash_at_manifest(target, data, prefix=".tmp-"):
        if str(target).endswith("/manifest.json"):
            raise OSError("simulated crash before the manifest")
        real_write(target, data, prefix)
    monkeypatch.setattr(storage, "write_bytes", crash_at_manifest)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write checkpoint"):
        checkpoint.save_in_run(run, _state(20, 2.0), job)
    monkeypatch.undo()

    step_20 = tmp_path / "run" / "checkpoints" / "step-000020"
    assert sorted(p.name for p in step_20.iterdir()) == sorted(ckpt_format.FILES)  # all but the manifest
    assert [step for step, _ in checkpoint.list_checkpoints(checkpoint.checkpoints_dir(run))] == [10]
    with caplog.at_level("WARNING"):
        path, ckpt = checkpoint.latest_valid(run)
    assert (path, ckpt.step) == (f"{run}/checkpoints/step-000010", 10)
    assert not caplog.records  # not a failed checkpoint: no checkpoint at all
    np.testing.assert_array_equal(ckpt.params["W1"], np.full((2, 3), 1.0))
    assert checkpoint.pointer(run) == f"{run}/checkpoints/step-000010"
    with pytest.raises(checkpoint.CheckpointError, match="no manifest.json"):
        checkpoint.load(f"{run}/checkpoints/step-000020")

    checkpoint.clean_leftovers(checkpoint.checkpoints_dir(run))
    assert not step_20.exists()
    assert checkpoint.save_in_run(run, _state(20, 2.0), job) == f"{run}/checkpoints/step-000020"
    assert checkpoint.latest_valid(run)[1].step == 20


def test_retention_and_replacing_a_checkpoint_on_an_object_store(tmp_path):
    run = f"file://{tmp_path}/run"
    job = _job()
    for step in (10, 20, 30, 40):
        checkpoint.save_in_run(run, _state(step, float(step)), job, keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(checkpoint.checkpoints_dir(run))] == [30, 40]
    checkpoint.save_in_run(run, _state(40, -1.0), job, keep_last=2)  # a resumed run saving step 40 again
    _, ckpt = checkpoint.resolve(run)
    assert ckpt.step == 40 and (ckpt.params["b1"] == -1.0).all()
    assert checkpoint.pointer(run) == checkpoint.pointer(run, "best") == f"{run}/checkpoints/step-000040"


def test_metrics_parts_read_back_in_order_and_a_resume_drops_the_later_records(tmp_path):
    run = f"file://{tmp_path}/run"

    def records(steps, loss):
        return [{"step": s, "epoch": 0.0, "samples_seen": s, "train_loss": loss, "lr": 0.1,
                 "step_s": 0.0, "compute_s": 0.0, "comm_s": 0.0} for s in steps]

    def run_writer(start, steps, loss):
        writer = metrics.MetricsWriter(run, checkpoint_every=5)
        writer.on_start(_state(start, 0.0), {})
        for r in records(steps, loss):
            writer.on_step(None, r)
        writer.on_end(None, None)

    run_writer(0, range(1, 13), 1.0)  # parts at steps 5, 10 and the end (12)
    parts = sorted(os.listdir(tmp_path / "run" / "metrics"))
    assert parts == ["part-000000.jsonl", "part-000001.jsonl", "part-000002.jsonl"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    run_writer(10, range(11, 16), 2.0)  # resumed from the step-10 checkpoint
    assert len(os.listdir(tmp_path / "run" / "metrics")) == 4  # one more, at step 15
    table = metrics.load(run).to_pydict()
    assert table["step"] == list(range(1, 16))
    assert table["train_loss"] == [1.0] * 10 + [2.0] * 5
    assert [r["step"] for r in metrics.read_parts(run)] == list(range(1, 16))
    os.remove(tmp_path / "run" / "metrics.parquet")  # a run killed before its end: the parts alone
    assert metrics.load(run).to_pydict()["train_loss"] == table["train_loss"]


def test_uri_paths_keep_their_query_and_bad_uris_are_one_line_errors():
    uri = "s3://bucket/runs/a?endpoint_override=127.0.0.1:9&scheme=http"
    assert storage.join(uri, "checkpoints", "latest") == (
        "s3://bucket/runs/a/checkpoints/latest?endpoint_override=127.0.0.1:9&scheme=http")
    assert storage.name(storage.join(uri, "step-000010")) == "step-000010"
    with pytest.raises(storage.StorageError, match=r"^nosuch://x/y: .*") as e:
        storage.is_dir("nosuch://x/y")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_tensorboard_events_and_the_mlflow_checkpoint_artifact_come_from_an_object_store(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    run = f"file://{tmp_path}/run"
    job = config.load_job(overrides=["run.steps=12", "run.eval_every=0", f"run.mlflow_uri={uri!r}",
                                     "run.name=\"remote\""])
    ckpt = checkpoint.CheckpointHook(run, job)
    hooks = driver.run_hooks(job, run, ckpt, quiet=True, echo=lambda line: None)
    trainer.train(job, trainer.LocalBackend(data.resolve(dataset="mnist-sample")), hooks=hooks)

    assert ckpt.last_path == f"{run}/checkpoints/step-000012"
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    client = MlflowClient(tracking_uri=uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("remote").experiment_id])
    assert mlflow_run.data.tags["distmlp.run_dir"] == run
    artifacts = {f.path for f in client.list_artifacts(mlflow_run.info.run_id, "checkpoint")}
    assert artifacts == {f"checkpoint/{name}" for name in (*checkpoint.FILES, "manifest.json")}
    local = client.download_artifacts(mlflow_run.info.run_id, "checkpoint", str(tmp_path / "dl"))
    assert checkpoint.load(local).step == 12


# --- a real S3 API on 127.0.0.1 (moto's server) ---

BUCKET = "distmlp-test"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """host:port of a moto S3 server on 127.0.0.1 holding an empty bucket BUCKET."""
    pytest.importorskip("moto", reason="needs moto[server] (the test extra)")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/{BUCKET}", method="PUT")
        urllib.request.urlopen(req, timeout=5)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def _cli(*args, check=True, env=()):
    env = {**os.environ, **S3_ENV, **dict(env)}
    distmlp = os.path.join(os.path.dirname(sys.executable), "distmlp")
    result = subprocess.run([distmlp, *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def _s3_checkpoint(uri):
    """Load a checkpoint from S3 in a subprocess (hostile-input rule: the bytes come from outside)."""
    code = ("import sys, json; from distmlp import checkpoint\n"
            "path, c = checkpoint.resolve(sys.argv[1])\n"
            "print(json.dumps({'path': path, 'step': c.step, 'params': {k: v.tolist() for k, v in c.params.items()}}))")
    result = subprocess.run([sys.executable, "-c", code, uri], capture_output=True, text=True,
                            env={**os.environ, **S3_ENV}, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_train_resume_inspect_plot_on_s3_match_a_local_run(s3_endpoint, tmp_path, monkeypatch):
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    query = f"?endpoint_override={s3_endpoint}&scheme=http"
    uri = f"s3://{BUCKET}/runs/a{query}"
    common = ["--workers", "0", "--set", "run.checkpoint_every=10", "--set", "run.eval_every=10", "--json"]
    local = json.loads(_cli("train", "--steps", "50", "--run-dir", str(tmp_path / "local"), *common).stdout
                       .splitlines()[-1])

    first = json.loads(_cli("train", "--steps", "30", "--run-dir", uri, *common).stdout.splitlines()[-1])
    assert first["checkpoint"] == f"s3://{BUCKET}/runs/a/checkpoints/step-000030{query}"
    resumed = _cli("train", "--resume", uri, "--steps", "50", "--json")
    assert f"from s3://{BUCKET}/runs/a/checkpoints/step-000030" in resumed.stderr
    assert json.loads(resumed.stdout.splitlines()[-1])["steps"] == 50

    ref = checkpoint.load(local["checkpoint"])
    on_s3 = _s3_checkpoint(uri)
    assert on_s3["step"] == 50
    for name, values in on_s3["params"].items():
        assert np.array_equal(np.asarray(values, dtype=ref.params[name].dtype), ref.params[name]), name

    # what is on S3: the parts, the step table, job.toml, TensorBoard's events, retention of 3 + best
    fs, _ = storage.split(uri)
    names = {info.path.removeprefix(f"{BUCKET}/runs/a/")
             for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs/a", recursive=True))}
    assert {"job.toml", "metrics.parquet", "checkpoints/latest", "checkpoints/best"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    steps = {n.split("/")[1] for n in names if n.startswith("checkpoints/step-")}
    assert {"step-000030", "step-000040", "step-000050"} <= steps and len(steps) <= 4

    # corrupt one byte of the newest checkpoint's params.parquet: resume falls back with one warning
    params_key = f"{BUCKET}/runs/a/checkpoints/step-000050/params.parquet"
    with fs.open_input_stream(params_key) as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF
    with fs.open_output_stream(params_key) as f:
        f.write(bytes(data))
    again = _cli("train", "--resume", uri, "--steps", "60", "--json")
    warnings = [line for line in again.stderr.splitlines() if "falling back" in line]
    assert len(warnings) == 1 and "step-000050/params.parquet" in warnings[0] and "checksum" in warnings[0]
    assert f"from s3://{BUCKET}/runs/a/checkpoints/step-000040" in again.stderr

    info = json.loads(_cli("checkpoint", "inspect", uri, "--json").stdout)
    assert info["verified"] and info["step"] == 60
    table = metrics.load(uri).to_pydict()
    assert table["step"] == list(range(1, 61))
    local_table = metrics.load(str(tmp_path / "local")).to_pydict()
    assert table["train_loss"][:50] == local_table["train_loss"]
    png = tmp_path / "curves.png"
    _cli("plot", uri, "-o", str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evaluated = json.loads(_cli("evaluate", uri, "--dataset", "mnist-sample", "--json").stdout)
    assert evaluated["test_accuracy"] == pytest.approx(info["metrics"]["test_accuracy"], abs=0)


def test_the_cached_s3_filesystems_are_dropped_before_pyarrow_finalizes_s3_at_exit():
    """An S3 client alive after pyarrow's exit-time finalization can abort the process at
    teardown; storage lets go of its cached filesystems first (atexit runs last-registered
    first, and pyarrow.fs registers its finalizer when imported, before distmlp.storage)."""
    script = """if True:
        import atexit, sys
        import pyarrow.fs as pafs
        def seen():  # what pyarrow's finalizer will find, just before it runs
            size = sys.modules["distmlp.storage"]._filesystem.cache_info().currsize
            print("cached filesystems when S3 is finalized:", size, flush=True)
        atexit.register(pafs.ensure_s3_finalized)  # runs after seen (atexit: last registered runs first)
        atexit.register(seen)
        from distmlp import storage  # registers storage._drop_filesystems, which runs before both
        fs, _ = storage.split("s3://bucket/runs/a?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
        assert type(fs).__name__ == "S3FileSystem" and storage._filesystem.cache_info().currsize == 1
        del fs
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == ["cached filesystems when S3 is finalized: 0"]


@pytest.mark.slow
def test_the_endpoint_from_the_environment_and_a_missing_bucket(s3_endpoint):
    env = {"AWS_ENDPOINT_URL": f"http://{s3_endpoint}"}
    run = f"s3://{BUCKET}/runs/env"
    summary = json.loads(_cli("train", "--workers", "0", "--steps", "3", "--run-dir", run, "--json", env=env)
                         .stdout.splitlines()[-1])
    assert summary["checkpoint"] == f"{run}/checkpoints/step-000003"
    again = _cli("train", "--workers", "0", "--steps", "3", "--run-dir", run, env=env, check=False)
    assert again.returncode == 2 and "run directory exists and is not empty" in again.stderr
    missing = _cli("train", "--workers", "0", "--steps", "3", "--run-dir", "s3://no-such-bucket/r", env=env,
                   check=False)
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == ["error: s3://no-such-bucket/r: no such bucket 'no-such-bucket'"]
    assert missing.stdout == ""  # refused before the data set and the backend
