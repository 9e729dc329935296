"""Experiment tracking: TensorBoard event files in the run directory, and MLflow (run.mlflow_uri).

Both are training-loop hooks that buffer step records and write them in batches
(metrics.BufferedHook): train/loss, test/loss, test/accuracy, lr, perf/step_ms and
perf/examples_per_s by step.
"""

import contextlib
import itertools
import logging
import math
import os
import shutil
import socket
import struct
import sys
import tempfile
import time

import crc32c
import numpy as np

from distmlp import config, storage
from distmlp.errors import UserError
from distmlp.metrics import BufferedHook

log = logging.getLogger("distmlp")


class TrackingError(UserError):
    """run.mlflow_uri cannot be used: mlflow is not installed, or the tracking store refused."""


def scalars(record, examples):
    """{name: value} MLflow logs for one step record; examples: how many the step trained on."""
    out = {"train/loss": record["train_loss"], "lr": record["lr"], "perf/step_ms": 1000 * record["step_s"]}
    if record["step_s"] > 0:
        out["perf/examples_per_s"] = examples / record["step_s"]
    if record.get("test_loss") is not None:
        out["test/loss"] = record["test_loss"]
        out["test/accuracy"] = record["test_accuracy"]
    return out


def job_params(job):
    """The job's fields flattened to {"section.key": text}."""
    return {f"{section}.{key}": str(value)
            for section, table in config.to_dict(job).items() for key, value in table.items()}


class ScalarHook(BufferedHook):
    """A BufferedHook whose rows are (wall time, record, examples the step trained on)."""

    def on_start(self, state, info):
        self._samples = state.samples_seen

    def rows(self, steps):
        samples = steps.columns["samples_seen"]
        examples = np.diff(samples, prepend=self._samples).tolist()
        self._samples = int(samples[-1])
        return list(zip(itertools.repeat(time.time()), steps.records(), examples))


class TensorBoardHook(ScalarHook):
    """Scalars by step in an event file in RUN_DIR (`tensorboard --logdir runs/`), and the job as
    text. Losses are logged at every step; lr, perf/step_ms and perf/examples_per_s once per
    write (every flush_s seconds), over the steps written, at the last of them. A resumed run
    hides the events after its resumed step (TensorBoard's purge). For a run directory on an
    object store the file is written in a local temporary directory and uploaded at the end."""

    flush_s = 2.0

    def __init__(self, run_dir, job):
        super().__init__()
        self.run_dir, self.job = run_dir, job
        self._writer = None
        self._events_dir = None  # where the event file is written: run_dir, or a local spool

    def on_start(self, state, info):
        summary, Event, SessionLog = _tensorboardx()
        super().on_start(state, info)
        self._Event = Event
        self._step_event = Event()  # a plain step's event, refilled for each: no new message per step
        self._step_loss = self._step_event.summary.value.add(tag="train/loss")
        remote = storage.is_remote(self.run_dir)
        self._events_dir = tempfile.mkdtemp(prefix="distmlp-events-") if remote else self.run_dir
        # the suffix keeps a resumed run's file apart from one started in the same second
        self._writer = EventFile(self._events_dir, f".{time.time_ns()}", Event)
        events = []
        if state.step > 0:
            events.append(Event(step=state.step + 1, session_log=SessionLog(status=SessionLog.START)))
        toml = "    " + config.to_toml(self.job).strip().replace("\n", "\n    ")  # a markdown code block
        events.append(Event(wall_time=time.time(), step=state.step, summary=summary.text("job", toml)))
        self._writer.write([event.SerializeToString() for event in events])

    def write(self, rows):
        events = [self._serialized(wall, record) for wall, record, _ in rows[:-1]]
        wall, final, _ = rows[-1]
        last = self._event(wall, final)
        step_s = sum(record["step_s"] for _, record, _ in rows)
        values = last.summary.value
        values.add(tag="lr", simple_value=final["lr"])
        values.add(tag="perf/step_ms", simple_value=1000 * step_s / len(rows))
        if step_s > 0:
            values.add(tag="perf/examples_per_s", simple_value=sum(n for _, _, n in rows) / step_s)
        events.append(last.SerializeToString())
        self._writer.write(events)

    def _serialized(self, wall, record):
        if record.get("test_loss") is not None:
            return self._event(wall, record).SerializeToString()
        event = self._step_event
        event.wall_time, event.step, self._step_loss.simple_value = wall, record["step"], record["train_loss"]
        return event.SerializeToString()

    def _event(self, wall, record):
        event = self._Event(wall_time=wall, step=record["step"])
        event.summary.value.add(tag="train/loss", simple_value=record["train_loss"])
        if record.get("test_loss") is not None:
            event.summary.value.add(tag="test/loss", simple_value=record["test_loss"])
            event.summary.value.add(tag="test/accuracy", simple_value=record["test_accuracy"])
        return event

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if storage.is_remote(self.run_dir):
                self._upload()

    def _upload(self):
        for name in os.listdir(self._events_dir):
            with open(os.path.join(self._events_dir, name), "rb") as f:
                storage.write_bytes(storage.join(self.run_dir, name), f.read())
        shutil.rmtree(self._events_dir, ignore_errors=True)


def _tensorboardx():
    """tensorboardX's summary module, Event and SessionLog, imported without torch.

    tensorboardX's package import tries `import torch` (to accept tensors), which takes about
    2.5 s where torch is installed; only scalars and text are written here, so torch is hidden
    from that one import unless something has imported it already."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import summary
        from tensorboardX.proto.event_pb2 import Event, SessionLog
    finally:
        if hide:
            del sys.modules["torch"]
    return summary, Event, SessionLog


class EventFile:
    """A TensorBoard event file as tensorboardX's EventsWriter makes it (the same name, a first
    event naming the file version, then one TFRecord per event: its length, the masked CRC-32C of
    the length, the serialized Event, the masked CRC-32C of that), written a batch of events at a
    time. EventsWriter frames each event with four writes and two checksums in Python and fsyncs
    at every flush, which cost more than making the events; a metrics file needs no fsync."""

    def __init__(self, directory, suffix, Event):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}{suffix}"
        self.path = os.path.join(directory, name)
        self._file = open(self.path, "wb")
        self._heads = {}  # {length: the record's first 12 bytes}: most events of a run have a few lengths
        self.write([Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()])

    def write(self, events):
        """Append serialized Events and flush them to the file."""
        self._file.write(b"".join(piece for data in events for piece in self._record(data)))
        self._file.flush()

    def _record(self, data):
        head = self._heads.get(len(data))
        if head is None:
            length = _LENGTH.pack(len(data))
            head = self._heads[len(data)] = length + _CRC.pack(_masked_crc(length))
        return head, data, _CRC.pack(_masked_crc(data))

    def close(self):
        self._file.close()


_LENGTH, _CRC = struct.Struct("<Q"), struct.Struct("<I")


def _masked_crc(data):
    """TFRecord's checksum: CRC-32C rotated right by 15 bits plus a constant, modulo 2**32."""
    x = crc32c.crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class MlflowHook(ScalarHook):
    """An MLflow run (experiment run.name) at tracking URI uri: the job's parameters (section.key),
    the scalars by step in batches (one log_batch call per flush), and at the end the last
    checkpoint directory (last_checkpoint() gives its path, a local one or a URI) as the artifact
    `checkpoint`.

    A failure to log during the run is a warning, and MLflow logging stops; the training goes on.
    """

    flush_s = 5.0

    def __init__(self, uri, job, run_dir, last_checkpoint):
        super().__init__()
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise TrackingError("run.mlflow_uri needs mlflow: pip install 'distmlp[mlflow]'") from None
        self.uri, self.job, self.run_dir, self.last_checkpoint = uri, job, run_dir, last_checkpoint
        self._Metric, self._Param = Metric, Param
        with self._errors():
            self._client = MlflowClient(tracking_uri=uri)
        self.run_id = None

    @contextlib.contextmanager
    def _errors(self):
        """Any error of the tracking store as a one-line TrackingError naming the URI."""
        try:
            yield
        except Exception as e:  # mlflow raises MlflowException, requests' and OS errors alike
            raise TrackingError(f"run.mlflow_uri {self.uri!r}: {_first_line(e)}") from None

    def on_start(self, state, info):
        super().on_start(state, info)
        with self._errors():
            name = self.job.run.name
            experiment = self._client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(name)
            where = self.run_dir if storage.is_remote(self.run_dir) else os.path.abspath(self.run_dir)
            tags = {"distmlp.run_dir": where, "distmlp.first_step": str(state.step)}
            run = self._client.create_run(experiment_id, run_name=storage.name(self.run_dir),
                                          tags=tags)
            params = [self._Param(k, v) for k, v in job_params(self.job).items()]
            self._client.log_batch(run.info.run_id, params=params)
        self.run_id = run.info.run_id

    def write(self, rows):
        if self.run_id is None:
            return
        metrics = [self._Metric(key, value, int(wall * 1000), record["step"])
                   for wall, record, examples in rows
                   for key, value in scalars(record, examples).items() if math.isfinite(value)]
        self._guard(lambda: self._client.log_batch(self.run_id, metrics=metrics))

    def close(self):
        if self.run_id is None:
            return
        path = self.last_checkpoint()
        if path is not None:
            self._guard(lambda: self._log_checkpoint(path))
        self._guard(lambda: self._client.set_terminated(self.run_id, "FINISHED"))
        self.run_id = None

    def _log_checkpoint(self, path):
        """The checkpoint directory as the artifact `checkpoint` (from an object store: through a
        local temporary copy, as MLflow uploads local files)."""
        if not storage.is_remote(path):
            return self._client.log_artifacts(self.run_id, str(path), artifact_path="checkpoint")
        with tempfile.TemporaryDirectory(prefix="distmlp-checkpoint-") as tmp:
            for name, _ in storage.listing(path):
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(storage.read_bytes(storage.join(path, name)))
            self._client.log_artifacts(self.run_id, tmp, artifact_path="checkpoint")

    def _guard(self, call):
        """call(); on failure warn once and stop logging to MLflow."""
        if self.run_id is None:
            return
        try:
            call()
        except Exception as e:  # as in _errors: the store's errors have no common base
            log.warning("MLflow logging to %s stopped: %s", self.uri, _first_line(e))
            self.run_id = None


def _first_line(e):
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
