"""TensorBoard event files and MLflow runs, read back with TensorBoard's own reader and an MLflow client."""

import builtins
import os
import subprocess
import sys

import pytest

from distmlp import checkpoint, config, data, driver, metrics, tracking, trainer


@pytest.fixture(scope="module")
def backend():
    return trainer.LocalBackend(data.resolve(dataset="mnist-sample"))


def small_job(steps=30, eval_every=10, **run):
    sets = [f"run.{k}={v!r}" if isinstance(v, str) else f"run.{k}={v}" for k, v in run.items()]
    return config.load_job(overrides=[f"run.steps={steps}", f"run.eval_every={eval_every}",
                                      "optimizer.lr=0.1", *sets])


class Records(trainer.Hook):
    def __init__(self):
        self.records = []

    def on_step(self, state, record):
        self.records.append(record)


def read_events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_scalars_by_step_match_the_records(tmp_path, backend):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job, seen = small_job(), Records()
    hook = tracking.TensorBoardHook(str(run_dir), job)
    hook.flush_s = 1e9  # one write, at the end
    trainer.train(job, backend, hooks=[seen, hook])
    acc = read_events(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "lr", "perf/step_ms", "perf/examples_per_s", "test/loss", "test/accuracy"}
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 31))
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in seen.records], rel=1e-6)
    evaluated = [r for r in seen.records if "test_accuracy" in r]
    assert [(e.step, e.value) for e in acc.Scalars("test/accuracy")] == \
        [(r["step"], pytest.approx(r["test_accuracy"], rel=1e-6)) for r in evaluated]
    assert [(e.step, e.value) for e in acc.Scalars("test/loss")] == \
        [(r["step"], pytest.approx(r["test_loss"], rel=1e-6)) for r in evaluated]
    # once per write, over the steps written
    step_s = sum(r["step_s"] for r in seen.records)
    assert [(e.step, e.value) for e in acc.Scalars("lr")] == [(30, pytest.approx(0.1))]
    assert [(e.step, e.value) for e in acc.Scalars("perf/step_ms")] == [(30, pytest.approx(1000 * step_s / 30))]
    assert [(e.step, e.value) for e in acc.Scalars("perf/examples_per_s")] == \
        [(30, pytest.approx(30 * 32 / step_s, rel=1e-6))]
    text = acc.Tensors("job/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "[optimizer]" in text and "lr = 0.1" in text


class RoundAStep(trainer.Hook):
    def next_stop(self, step):
        return step + 1


def test_tensorboard_writing_every_round_logs_speed_at_every_round(tmp_path, backend):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job, seen = small_job(steps=5, eval_every=0), Records()
    hook = tracking.TensorBoardHook(str(run_dir), job)
    hook.flush_s = 0.0
    trainer.train(job, backend, hooks=[seen, hook, RoundAStep()])  # rounds of one step
    acc = read_events(run_dir)
    assert [(e.step, e.value) for e in acc.Scalars("perf/examples_per_s")] == \
        [(r["step"], pytest.approx(32 / r["step_s"], rel=1e-6)) for r in seen.records]


def test_tensorboard_resume_hides_the_steps_after_the_resumed_one(tmp_path, backend):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    job = small_job(steps=20, eval_every=0)
    trainer.train(job, backend, hooks=[tracking.TensorBoardHook(str(run_dir), job)])
    state = trainer.initial_state(job)
    state.step, state.samples_seen = 8, 8 * 32
    seen = Records()
    trainer.train(job, backend, state=state, hooks=[seen, tracking.TensorBoardHook(str(run_dir), job)])
    loss = read_events(run_dir).Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 21))  # steps 9-20 once, from the resumed run
    assert [e.value for e in loss[8:]] == pytest.approx([r["train_loss"] for r in seen.records], rel=1e-6)


def test_event_file_records_are_the_bytes_tensorboardx_writes(tmp_path):
    """EventFile frames events itself; tensorboardX's EventsWriter is the reference, record by record."""
    _, Event, _ = tracking._tensorboardx()
    from tensorboardX.event_file_writer import EventsWriter
    events = [Event(wall_time=1.5e9 + i, step=i) for i in range(300)]
    for i, event in enumerate(events):
        event.summary.value.add(tag="train/loss", simple_value=1.0 / (i + 1))
        if i % 7 == 0:  # records of several lengths
            event.summary.value.add(tag="test/accuracy", simple_value=0.5)
    ours = tracking.EventFile(str(tmp_path), ".ours", Event)
    ours.write([e.SerializeToString() for e in events[:100]])
    ours.write([e.SerializeToString() for e in events[100:]])
    ours.close()
    reference = EventsWriter(str(tmp_path / "ref"), ".ref")
    for event in events:
        reference.write_event(event)
    reference.close()
    [ref_path] = tmp_path.glob("ref.out.tfevents.*.ref")
    assert os.path.basename(ours.path).startswith("events.out.tfevents.")

    def records(path):  # [(header, data, footer)], checked against the file's length
        blob, out, at = open(path, "rb").read(), [], 0
        while at < len(blob):
            n = int.from_bytes(blob[at:at + 8], "little")
            out.append((blob[at:at + 12], blob[at + 12:at + 12 + n], blob[at + 12 + n:at + 16 + n]))
            at += 16 + n
        assert at == len(blob)
        return out

    first, *rest = records(ours.path)
    assert Event.FromString(first[1]).file_version == "brain.Event:2"
    assert rest == records(ref_path)[1:]  # the first record holds each file's creation time


@pytest.mark.slow
def test_mlflow_gets_params_metrics_by_step_and_the_last_checkpoint(tmp_path, backend, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 asks for a database, which needs sqlalchemy
    uri = (tmp_path / "mlruns").as_uri()
    run_dir = tmp_path / "run"
    job = small_job(mlflow_uri=uri, name="exp1")
    ckpt = checkpoint.CheckpointHook(str(run_dir), job)
    batches = []
    real_log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch",
                        lambda self, run_id, metrics=(), **kw: batches.append(len(metrics)) or
                        real_log_batch(self, run_id, metrics=metrics, **kw))
    seen = Records()
    hooks = [seen, *driver.run_hooks(job, str(run_dir), ckpt, quiet=True, echo=lambda line: None)]
    trainer.train(job, backend, hooks=hooks)

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("exp1").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.params["run.steps"] == "30"
    assert run.data.params["model.sizes"] == "[784, 16, 16, 10]"
    assert set(run.data.params) == {f"{s}.{k}" for s, t in config.to_dict(job).items() for k in t}
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == \
        [(r["step"], pytest.approx(r["train_loss"])) for r in seen.records]
    accuracy = client.get_metric_history(run.info.run_id, "test/accuracy")
    assert sorted((m.step, m.value) for m in accuracy) == \
        [(r["step"], pytest.approx(r["test_accuracy"])) for r in seen.records if "test_accuracy" in r]
    # batched: one call for the parameters and few for 30 steps' metrics, not one per step
    assert batches[0] == 0 and 1 <= len(batches) - 1 <= 3 and sum(batches) == 30 * 4 + 3 * 2
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert "checkpoint/manifest.json" in artifacts and "checkpoint/state.json" in artifacts


def test_mlflow_bad_uri_is_a_one_line_error(tmp_path):
    job = small_job(mlflow_uri="nosuchscheme://x")
    with pytest.raises(tracking.TrackingError) as e:
        hook = tracking.MlflowHook(job.run.mlflow_uri, job, str(tmp_path / "run"), lambda: None)
        hook.on_start(trainer.initial_state(job), {})
    assert str(e.value).startswith("run.mlflow_uri 'nosuchscheme://x': ") and "\n" not in str(e.value)


def test_mlflow_not_installed_names_the_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    job = small_job(mlflow_uri="file:///nowhere")
    with pytest.raises(tracking.TrackingError, match=r"^run.mlflow_uri needs mlflow: pip install 'distmlp\[mlflow\]'$"):
        tracking.MlflowHook(job.run.mlflow_uri, job, str(tmp_path), lambda: None)


def test_writing_event_files_does_not_import_torch(tmp_path):
    """tensorboardX would import torch (about 2.5 s where installed) for tensors this never writes."""
    code = ("import sys; from distmlp import config, tracking\n"
            "hook = tracking.TensorBoardHook(sys.argv[1], config.load_job(None, []))\n"
            "from distmlp.trainer import initial_state\n"
            "hook.on_start(initial_state(config.load_job(None, [])), {})\n"
            "hook.close(); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert any(name.startswith("events") for name in os.listdir(tmp_path))
