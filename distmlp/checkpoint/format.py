"""The checkpoint format: one directory saved atomically and verified before use.

    params.parquet     one row per weight/bias: name, shape, dtype, values (float64, exact for float32)
    optimizer.parquet  same columns: momentum velocities keyed like params (no rows for plain SGD)
    state.json         step, epoch, samples_seen, nonfinite_streak, sampler state, latest metrics
    job.json           the resolved job config
    manifest.json      format name and version, and the SHA-256 of every file above

The directory may be a URI of an object store (distmlp.storage): there the files are written
one object each and the manifest last, so a checkpoint without its manifest is an unfinished one.
"""

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distmlp import arrow, config, fsutil, storage
from distmlp.errors import UserError

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
LEFTOVER_PREFIX = ".tmp-"  # temporary files and directories of a save in progress
ASIDE_PREFIX = ".old-"  # a checkpoint moved aside while save replaces it


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


def save(path, state, job, sampler_state=None, epoch=0.0):
    """Write TrainState as a checkpoint directory at path, atomically; returns the path.

    Files go to a temporary sibling directory, are fsynced, and the directory is renamed
    into place (an existing checkpoint at path is replaced); a crash leaves the old or the new
    (the old one possibly aside, see _rename_into_place). On an object store see _put_objects.
    """
    path = storage.location(path)
    _check_finite(state)
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
    if storage.is_remote(path):
        return _put_objects(path, files)
    _check_replaceable(path)
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


def _put_objects(path, files):
    """Write files (manifest.json last) as objects under path. A checkpoint replaced there loses
    its manifest first: a crash leaves a directory without one, which readers skip and
    run_dir.clean_leftovers removes."""
    try:
        storage.remove_file(storage.join(path, "manifest.json"))
        for name, data in files.items():
            storage.write_bytes(storage.join(path, name), data)
    except (OSError, storage.StorageError) as e:
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
    table = pa.Table.from_arrays([
        arrow.strings(names),
        arrow.lists([np.asarray(arrays[n].shape, np.int64) for n in names], np.int64),
        arrow.strings([arrays[n].dtype.name for n in names]),
        arrow.lists([arrays[n].astype(np.float64).ravel() for n in names], np.float64),
    ], schema=ARRAY_SCHEMA)
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
    """Rename tmp to path. An existing path is first renamed aside to ASIDE_PREFIX + its name:
    if a crash comes before tmp takes its place, readers list the aside copy and the run
    directory's cleanup restores it; it is removed once tmp is in place."""
    aside = path.with_name(ASIDE_PREFIX + path.name)
    replacing = path.exists()
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)  # left by an earlier crash; path is newer
        os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except OSError:
        if replacing:
            os.rename(aside, path)
        raise
    fsutil.fsync_dir(path.parent)
    shutil.rmtree(aside, ignore_errors=True)


def write_atomic(path, data):
    """Write bytes to path via a synced temporary file and a rename (one PUT on an object store)."""
    storage.write_bytes(path, data, prefix=f"{LEFTOVER_PREFIX}{storage.name(path)}-")


def load(path):
    """Read and verify a checkpoint: manifest, checksums, then schema and shapes, then arrays."""
    path = storage.location(path)
    if not storage.is_dir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    raw = _verified_files(path)
    state = _parse_json(storage.join(path, "state.json"), raw["state.json"])
    _check_state(storage.join(path, "state.json"), state)
    job = _parse_job(storage.join(path, "job.json"), raw["job.json"])
    shapes = expected_shapes(job.model.sizes)
    params_path, opt_path = storage.join(path, "params.parquet"), storage.join(path, "optimizer.parquet")
    params = _read_arrays(params_path, raw["params.parquet"], shapes)
    _check_like(params_path, params, shapes, job.model.dtype, f"model.sizes {list(job.model.sizes)}")
    opt_state = _read_arrays(opt_path, raw["optimizer.parquet"], shapes)
    _check_opt_state(opt_path, opt_state, params, job)
    return Checkpoint(str(path), job, params, opt_state, state["step"], state["epoch"],
                      state["samples_seen"], state["nonfinite_streak"], state["sampler"], state["metrics"])


def _verified_files(path):
    """{name: bytes} of every checkpoint file, each matching its manifest SHA-256."""
    manifest_path = storage.join(path, "manifest.json")
    try:
        manifest = _parse_json(manifest_path, storage.read_bytes(manifest_path))
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: not a checkpoint (no manifest.json)") from None
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
            data = storage.read_bytes(storage.join(path, name))
        except FileNotFoundError:
            raise CheckpointError(f"{storage.join(path, name)}: missing (listed in manifest.json)") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sums[name]:
            raise CheckpointError(f"{storage.join(path, name)}: checksum mismatch: manifest says sha256 "
                                  f"{str(sums[name])[:12]}..., file has {actual[:12]}...")
        raw[name] = data
    return raw


def _parse_json(path, data):
    try:
        obj = json.loads(data)
    except ValueError as e:  # undecodable bytes, bad syntax, an int past Python's digit limit
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


def _read_arrays(path, data, shapes):
    """{name: array} from a verified Parquet file of at most the arrays in shapes: its size
    (from the metadata, before anything is decoded) and its schema checked first."""
    try:
        _check_parquet_size(path, pq.ParquetFile(pa.BufferReader(data)).metadata, shapes)
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


def _check_parquet_size(path, metadata, shapes):
    """Refuse metadata claiming far more rows, values or bytes than shapes hold, before
    decoding: a few KB of Parquet (one value run-length encoded) can decode to gigabytes."""
    rows, values = len(shapes), sum(math.prod(shape) for shape in shapes.values())
    most_rows = 4 * rows  # 4x: a near miss (another hidden width) gets the exact shape error later
    most_values = 4 * (values + 5 * rows)  # + a slot per empty list, 1-2 per shape, name, dtype
    most_bytes = 16 * most_values + 2 ** 16  # plain float64 values, levels and page headers
    chunks = [metadata.row_group(i).column(j)
              for i in range(metadata.num_row_groups) for j in range(metadata.num_columns)]
    found_values = sum(chunk.num_values for chunk in chunks)
    found_bytes = sum(chunk.total_uncompressed_size for chunk in chunks)
    if metadata.num_rows > most_rows or found_values > most_values or found_bytes > most_bytes:
        raise CheckpointError(f"{path}: {metadata.num_rows} rows of {found_values} values "
                              f"({found_bytes} bytes uncompressed); the job's model.sizes allow at most "
                              f"{most_rows} rows of {most_values} values ({most_bytes} bytes)")


def expected_shapes(sizes):
    """{"W1": (16, 784), "b1": (16,), ...} for layer widths sizes."""
    shapes = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes[f"W{i}"], shapes[f"b{i}"] = (fan_out, fan_in), (fan_out,)
    return shapes


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
