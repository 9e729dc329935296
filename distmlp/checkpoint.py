"""Checkpoints: Parquet directories saved atomically, verified before use, kept by retention.

One checkpoint is a directory:

    params.parquet     one row per weight/bias: name, shape, dtype, values (float64, exact for float32)
    optimizer.parquet  same columns: momentum velocities keyed like params (no rows for plain SGD)
    state.json         step, epoch, samples_seen, nonfinite_streak, sampler state, latest metrics
    job.json           the resolved job config
    manifest.json      format name and version, and the SHA-256 of every file above

A run directory keeps them as RUN_DIR/checkpoints/step-000123/, with the text files
`latest` and `best` (held-out accuracy) naming one of them. Only the driver writes them.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distmlp import config, fsutil, mlp, optim, safe_pickle, trainer
from distmlp.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "distmlp-checkpoint"
FORMAT_VERSION = 1
FILES = ("params.parquet", "optimizer.parquet", "state.json", "job.json")
ARRAY_SCHEMA = pa.schema([
    ("name", pa.string()),  # "W1", "b1", ...
    ("shape", pa.list_(pa.int64())),  # (out, in) for W, (out,) for b
    ("dtype", pa.string()),  # the model dtype the values are cast back to
    ("values", pa.list_(pa.float64())),  # row-major, float64 holds float32 exactly
])
STATE_KEYS = {"step": int, "epoch": (int, float), "samples_seen": int, "nonfinite_streak": int,
              "sampler": (dict, type(None)), "metrics": dict}
STEP_DIR = re.compile(r"step-(\d+)")
LEFTOVER_PREFIX = ".tmp-"

SEED_SIZES = (784, 16, 16, 10)
SEED_KEYS = {  # the seed notebook's pickle keys -> distmlp parameter names
    "weights_input_to_hidden1": "W1", "biases_hidden1": "b1",
    "weights_hidden1_to_hidden2": "W2", "biases_hidden2": "b2",
    "weights_hidden2_to_output": "W3", "biases_output": "b3",
}


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be written or trusted; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    path: str
    job: config.JobConfig
    params: dict
    opt_state: dict
    step: int
    epoch: float
    samples_seen: int
    nonfinite_streak: int
    sampler: dict | None  # Sampler.state() of the run, None when unknown (imported weights)
    metrics: dict  # the latest step record


# ------------------------------------------------------------------------------ saving


def save(path, state, job, sampler_state=None, epoch=0.0):
    """Write TrainState as a checkpoint directory at path, atomically; returns the path.

    Files go to a temporary sibling directory, are fsynced, and the directory is renamed
    into place (an existing checkpoint at path is replaced); a crash leaves the old or the new.
    """
    path = Path(path)
    _check_finite(state)
    _check_replaceable(path)
    files = {
        "params.parquet": _arrays_parquet(state.params),
        "optimizer.parquet": _arrays_parquet(state.opt_state),
        "state.json": _json_bytes({"step": state.step, "epoch": float(epoch),
                                   "samples_seen": state.samples_seen,
                                   "nonfinite_streak": state.nonfinite_streak,
                                   "sampler": sampler_state, "metrics": state.metrics}),
        "job.json": _json_bytes(dataclasses.asdict(job)),
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    files["manifest.json"] = _json_bytes(manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{LEFTOVER_PREFIX}{path.name}-", dir=path.parent))
    try:
        for name, data in files.items():
            fsutil.write_synced(tmp / name, data)
        fsutil.fsync_dir(tmp)
        _rename_into_place(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{path}: cannot write checkpoint: {e}") from None
    return str(path)


def _check_finite(state):
    for group, arrays in (("params", state.params), ("optimizer state", state.opt_state)):
        for name, a in arrays.items():
            if not np.isfinite(a).all():
                raise CheckpointError(f"refusing to checkpoint step {state.step}: {group} {name} "
                                      "has non-finite values")


def _check_replaceable(path):
    if path.exists() and not (path / "manifest.json").is_file():
        raise CheckpointError(f"{path}: exists and is not a checkpoint; refusing to replace it")


def _arrays_parquet(arrays):
    """Parquet bytes of a dict of arrays, one row each."""
    names = list(arrays)
    table = pa.table({
        "name": pa.array(names, pa.string()),
        "shape": pa.array([list(arrays[n].shape) for n in names], pa.list_(pa.int64())),
        "dtype": pa.array([arrays[n].dtype.name for n in names], pa.string()),
        "values": pa.array([arrays[n].astype(np.float64).ravel() for n in names], pa.list_(pa.float64())),
    }, schema=ARRAY_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def _json_bytes(obj):
    return (json.dumps(obj, indent=2, sort_keys=True, default=_json_scalar) + "\n").encode()


def _json_scalar(value):
    """NumPy scalars in metrics or sampler state (np.float32(0.5), np.int64(8000)) as Python numbers."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _rename_into_place(tmp, path):
    """Rename tmp to path; an existing path is moved aside first and removed after."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{LEFTOVER_PREFIX}old-{path.name}-", dir=path.parent))
        os.rename(path, old / path.name)
    try:
        os.rename(tmp, path)
    except OSError:
        if old is not None:
            os.rename(old / path.name, path)
            shutil.rmtree(old, ignore_errors=True)
        raise
    fsutil.fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path, data):
    """Write bytes to path via a synced temporary file and a rename."""
    path = Path(path)
    fsutil.atomic_write(path, lambda tmp: fsutil.write_synced(tmp, data), prefix=f"{LEFTOVER_PREFIX}{path.name}-")


# ----------------------------------------------------------------------------- loading


def load(path):
    """Read and verify a checkpoint: manifest, checksums, then schema and shapes, then arrays."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raw = _verified_files(path)
    state = _parse_json(path / "state.json", raw["state.json"])
    _check_state(path / "state.json", state)
    job = _parse_job(path / "job.json", raw["job.json"])
    params = _read_arrays(path / "params.parquet", raw["params.parquet"])
    _check_params(path / "params.parquet", params, job)
    opt_state = _read_arrays(path / "optimizer.parquet", raw["optimizer.parquet"])
    _check_opt_state(path / "optimizer.parquet", opt_state, params, job)
    return Checkpoint(str(path), job, params, opt_state, state["step"], state["epoch"],
                      state["samples_seen"], state["nonfinite_streak"], state["sampler"], state["metrics"])


def _verified_files(path):
    """{name: bytes} of every checkpoint file, each matching its manifest SHA-256."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json)")
    manifest = _parse_json(manifest_path, manifest_path.read_bytes())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{manifest_path}: format_version {manifest.get('format_version')!r}, "
                              f"this distmlp reads version {FORMAT_VERSION}")
    sums = manifest.get("files")
    if not isinstance(sums, dict) or sorted(sums) != sorted(FILES):
        listed = sorted(sums) if isinstance(sums, dict) else sums
        raise CheckpointError(f"{manifest_path}: files {listed}, expected {sorted(FILES)}")
    raw = {}
    for name in FILES:
        try:
            data = (path / name).read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{path / name}: missing (listed in manifest.json)") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sums[name]:
            raise CheckpointError(f"{path / name}: checksum mismatch: manifest says sha256 "
                                  f"{str(sums[name])[:12]}..., file has {actual[:12]}...")
        raw[name] = data
    return raw


def _parse_json(path, data):
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _check_state(path, state):
    if set(state) != set(STATE_KEYS):
        raise CheckpointError(f"{path}: keys {sorted(state)}, expected {sorted(STATE_KEYS)}")
    for key, types in STATE_KEYS.items():
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, types) or (types is int and value < 0):
            raise CheckpointError(f"{path}: {key} = {value!r} is not a valid {key}")


def _parse_job(path, data):
    try:
        return config.job_from_dict(_parse_json(path, data), source=str(path))
    except config.ConfigError as e:
        message = str(e) if str(e).startswith(str(path)) else f"{path}: {e}"
        raise CheckpointError(message.replace("\r", "\\r").replace("\n", "\\n")) from None  # keys may hold newlines


def _read_arrays(path, data):
    """{name: array} from a verified Parquet file, its schema checked first."""
    try:
        table = pq.read_table(pa.BufferReader(data), use_threads=False)  # threads: abort at exit (pyarrow 26)
    except (pa.ArrowException, OSError) as e:
        raise CheckpointError(f"{path}: not a readable Parquet file: {' '.join(str(e).split())}") from None
    if not table.schema.equals(ARRAY_SCHEMA):
        found = ", ".join(f"{f.name}: {f.type}" for f in table.schema)
        raise CheckpointError(f"{path}: columns ({found}), expected "
                              f"({', '.join(f'{f.name}: {f.type}' for f in ARRAY_SCHEMA)})")
    for column in ("name", "shape", "dtype", "values"):
        if table.column(column).null_count:
            raise CheckpointError(f"{path}: column {column} has missing values")
    arrays = {}
    columns = table.combine_chunks()
    for i, name in enumerate(columns.column("name").to_pylist()):
        shape = tuple(columns.column("shape")[i].as_py())
        dtype = columns.column("dtype")[i].as_py()
        if name in arrays:
            raise CheckpointError(f"{path}: {name} appears twice")
        if dtype not in config.DTYPES:
            raise CheckpointError(f"{path}: {name} has dtype {dtype!r}; allowed: {', '.join(config.DTYPES)}")
        values = columns.column("values").chunk(0)[i].values.to_numpy(zero_copy_only=False)  # (prod(shape),)
        if any(d < 0 for d in shape) or values.size != math.prod(shape):
            raise CheckpointError(f"{path}: {name} has {values.size} values for shape {list(shape)}")
        if not np.isfinite(values).all():
            raise CheckpointError(f"{path}: {name} has non-finite or missing values")
        arrays[name] = values.reshape(shape).astype(dtype)
    return arrays


def expected_shapes(sizes):
    """{"W1": (16, 784), "b1": (16,), ...} for layer widths sizes."""
    shapes = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"W{i}"], shapes[f"b{i}"] = (fan_out, fan_in), (fan_out,)
    return shapes


def _check_params(path, params, job):
    _check_like(path, params, expected_shapes(job.model.sizes), job.model.dtype,
                f"model.sizes {list(job.model.sizes)}")


def _check_opt_state(path, opt_state, params, job):
    if job.optimizer.momentum == 0.0:
        if opt_state:
            raise CheckpointError(f"{path}: holds {sorted(opt_state)} but the job's optimizer has no momentum")
        return
    _check_like(path, opt_state, {n: p.shape for n, p in params.items()}, job.model.dtype, "the params")


def _check_like(path, arrays, shapes, dtype, what):
    if list(arrays) != list(shapes):
        raise CheckpointError(f"{path}: arrays {list(arrays)}, expected {list(shapes)} for {what}")
    for name, a in arrays.items():
        if a.shape != tuple(shapes[name]):
            raise CheckpointError(f"{path}: {name} has shape {list(a.shape)}, expected "
                                  f"{list(shapes[name])} for {what}")
        if a.dtype.name != dtype:
            raise CheckpointError(f"{path}: {name} is {a.dtype.name}, the job's model.dtype is {dtype}")


# ---------------------------------------------------------------------- run directories


def checkpoints_dir(run_dir):
    return Path(run_dir) / "checkpoints"


def step_name(step):
    return f"step-{step:06d}"


def list_checkpoints(ckpt_dir):
    """[(step, path)] of the step-N directories in ckpt_dir, oldest first; leftovers ignored."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        match = STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def save_in_run(run_dir, state, job, sampler_state=None, epoch=0.0, keep_last=3):
    """Save RUN_DIR/checkpoints/step-N, update `latest` and `best`, prune to keep_last + best."""
    ckpt_dir = checkpoints_dir(run_dir)
    path = save(ckpt_dir / step_name(state.step), state, job, sampler_state, epoch)
    write_atomic(ckpt_dir / "latest", f"{Path(path).name}\n".encode())
    best = _best(ckpt_dir)
    if best is not None:
        write_atomic(ckpt_dir / "best", f"{best.name}\n".encode())
    _prune(ckpt_dir, keep_last, best)
    clean_leftovers(ckpt_dir)
    return path


def _accuracy(path):
    """The held-out accuracy recorded in a checkpoint (unverified: used only for ranking)."""
    try:
        value = json.loads((Path(path) / "state.json").read_text())["metrics"].get("test_accuracy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _best(ckpt_dir):
    """The checkpoint with the highest held-out accuracy (the newest among ties), or None."""
    scored = [(acc, step, path) for step, path in list_checkpoints(ckpt_dir)
              if (acc := _accuracy(path)) is not None]
    return max(scored)[2] if scored else None


def _prune(ckpt_dir, keep_last, best):
    checkpoints = list_checkpoints(ckpt_dir)
    keep = {path for _, path in checkpoints[-keep_last:]} | {best}
    for _, path in checkpoints:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(ckpt_dir):
    """Remove temporary files and directories a crashed save left behind."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for entry in ckpt_dir.iterdir():
        if entry.name.startswith(LEFTOVER_PREFIX):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def pointer(run_dir, which="latest"):
    """The checkpoint path named by RUN_DIR/checkpoints/latest (or best), or None."""
    ckpt_dir = checkpoints_dir(run_dir)
    try:
        name = (ckpt_dir / which).read_text().strip()
    except FileNotFoundError:
        return None
    return str(ckpt_dir / name) if STEP_DIR.fullmatch(name) else None


def latest_valid(run_dir):
    """(path, Checkpoint) of the newest checkpoint that verifies, warning for each one skipped."""
    checkpoints = list_checkpoints(checkpoints_dir(run_dir))
    if not checkpoints:
        raise CheckpointError(f"{run_dir}: no checkpoints (looked in {checkpoints_dir(run_dir)})")
    failures = []
    for _, path in reversed(checkpoints):
        try:
            ckpt = load(path)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for failure in failures:
            log.warning("%s; falling back to the previous good checkpoint %s", failure, path)
        return str(path), ckpt
    raise CheckpointError(f"{run_dir}: no valid checkpoint; newest failure: {failures[0]}")


def resolve(path):
    """(path, Checkpoint) for a checkpoint directory, or a run directory (its newest valid)."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return str(path), load(path)
    if checkpoints_dir(path).is_dir():
        return latest_valid(path)
    raise CheckpointError(f"{path}: neither a checkpoint directory (no manifest.json) "
                          "nor a run directory (no checkpoints/)")


# ------------------------------------------------------------------ the training loop


class CheckpointHook(trainer.Hook):
    """Saves into RUN_DIR/checkpoints every `every` steps (0: only at the end) and at the end."""

    def __init__(self, run_dir, job, every=None, keep_last=None):
        self.run_dir = Path(run_dir)
        self.job = job
        self.every = job.run.checkpoint_every if every is None else every
        self.keep_last = job.run.keep_last if keep_last is None else keep_last
        self.last_path = None  # the newest checkpoint saved
        self._sampler_state, self._steps_per_epoch, self._saved_step = None, 1, None

    def on_start(self, state, info):
        self._sampler_state = trainer.make_sampler(self.job, info["n_train"]).state()
        self._steps_per_epoch = info["steps_per_epoch"]
        clean_leftovers(checkpoints_dir(self.run_dir))

    def next_stop(self, step):
        """The next step to save at: the training loop has the weights there (mesh rounds end)."""
        return (step // self.every + 1) * self.every if self.every > 0 else None

    def on_step(self, state, record):
        if self.every > 0 and record["step"] % self.every == 0:
            self._save(state)

    def on_end(self, state, record):
        if self._saved_step != state.step:
            self._save(state)

    def _save(self, state):
        epoch = state.step / self._steps_per_epoch
        self.last_path = save_in_run(self.run_dir, state, self.job, self._sampler_state, epoch, self.keep_last)
        self._saved_step = state.step


def to_train_state(ckpt):
    """A TrainState to continue training from (arrays copied)."""
    return trainer.TrainState(
        params={n: a.copy() for n, a in ckpt.params.items()},
        opt_state={n: a.copy() for n, a in ckpt.opt_state.items()},
        step=ckpt.step, samples_seen=ckpt.samples_seen,
        nonfinite_streak=ckpt.nonfinite_streak, metrics=dict(ckpt.metrics))


def check_sampler(ckpt, sampler):
    """Refuse to resume when the job would draw different batches than the checkpointed run."""
    if ckpt.sampler is not None and ckpt.sampler != sampler.state():
        raise CheckpointError(f"{ckpt.path}: sampler state {ckpt.sampler} does not match this job's "
                              f"{sampler.state()} (different data, optimizer, batch size or seed)")


# --------------------------------------------------------------------- the seed's pickle


def to_seed_dict(params):
    """The seed notebook's dict: its six keys, nested lists of Python floats, weights[out][in]."""
    sizes = mlp.layer_sizes(params)
    if sizes != SEED_SIZES:
        raise CheckpointError(f"the seed pickle format holds only a {'-'.join(map(str, SEED_SIZES))} "
                              f"model (six keys); this model is {'-'.join(map(str, sizes))}")
    return {key: params[name].astype(np.float64).tolist() for key, name in SEED_KEYS.items()}


def export_seed_pickle(ckpt, path):
    """Write ckpt's weights as the seed's weights_biases.pkl (atomically)."""
    payload = pickle.dumps(to_seed_dict(ckpt.params))
    try:
        write_atomic(path, payload)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e}") from None
    return str(path)


def from_seed_dict(obj, source, dtype="float64"):
    """params from a seed-format dict, every key, shape and value checked."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected the seed's dict of six keys, got {type(obj).__name__}")
    missing = [k for k in SEED_KEYS if k not in obj]
    extra = sorted(str(k) for k in obj if k not in SEED_KEYS)
    if missing or extra:
        raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {extra}; "
                              f"the seed format has exactly {', '.join(SEED_KEYS)}")
    shapes = expected_shapes(SEED_SIZES)
    params = {}
    for key, name in SEED_KEYS.items():
        try:
            a = np.asarray(obj[key], dtype=np.float64)
        except (ValueError, TypeError):
            raise CheckpointError(f"{source}: {key} is not a rectangular list of numbers") from None
        if a.shape != shapes[name]:
            raise CheckpointError(f"{source}: {key} has shape {list(a.shape)}, expected {list(shapes[name])}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{source}: {key} has non-finite values")
        params[name] = a.astype(dtype)
    return {name: params[name] for name in mlp.param_names(3)}


def import_seed_pickle(path, run_dir, trust=False, job=None):
    """Turn a seed weights_biases.pkl into a new run directory holding a step-0 checkpoint.

    Returns the checkpoint's path; `evaluate RUN_DIR` and `train --resume RUN_DIR` take it.
    job defaults to the default job with model.dtype float64 (the seed's Python floats).
    """
    job = job or config.replace(config.JobConfig(), model={"dtype": "float64"})
    if tuple(job.model.sizes) != SEED_SIZES:
        raise CheckpointError(f"model.sizes {list(job.model.sizes)}: a seed pickle is a "
                              f"{'-'.join(map(str, SEED_SIZES))} model")
    if Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise CheckpointError(f"{run_dir}: exists and is not empty; import into a new directory")
    params = from_seed_dict(safe_pickle.load(path, trust=trust), str(path), job.model.dtype)
    state = trainer.TrainState(params, optim.init_state(params, job.optimizer.momentum))
    return save_in_run(run_dir, state, job)


# ------------------------------------------------------------------------------ inspect


def describe(path):
    """What `checkpoint inspect` shows: verified or not (and why), step, layers, metrics, config."""
    try:
        path, ckpt = resolve(path)
    except CheckpointError as e:
        return {"path": str(path), "verified": False, "error": str(e)}
    return {"path": path, "verified": True, "error": None, "step": ckpt.step, "epoch": ckpt.epoch,
            "samples_seen": ckpt.samples_seen, "sizes": list(mlp.layer_sizes(ckpt.params)),
            "dtype": ckpt.job.model.dtype, "optimizer_state": sorted(ckpt.opt_state),
            "metrics": ckpt.metrics, "config": config.to_dict(ckpt.job)}
