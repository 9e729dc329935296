"""Job configuration: frozen dataclasses, TOML job files and `--set section.key=value` overrides.

A job file has up to five tables, each optional, each field optional:

    [model]      sizes = [784, 16, 16, 10], dtype = "float32", kernel = "numpy"
    [optimizer]  name = "minibatch", lr = 0.1, batch_size = 32, sampling = "shuffle"
    [data]       dataset = "mnist-sample"          (or path = "some/idx/or/parquet/dir")
    [run]        name, seed, epochs | steps, eval_every, log_every, checkpoint_every, ...
    [cluster]    workers = 2, address, placement = "SPREAD", max_failures, step_timeout_s

Unknown tables or keys, wrong types and out-of-range values raise ConfigError with one line
that names the key and what is allowed.
"""

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field

from distmlp.errors import UserError

OPTIMIZERS = ("sgd", "minibatch", "gd")
SAMPLINGS = ("shuffle", "sample", "sequential")
DTYPES = ("float32", "float64")
KERNELS = ("numpy", "numba")
PLACEMENTS = ("SPREAD", "PACK", "STRICT_SPREAD", "STRICT_PACK")
NONFINITE_POLICIES = ("stop", "skip")
TRANSPORTS = ("auto", "actors", "mesh", "collective")
CHECKPOINT_FORMATS = ("parquet",)

# The seed notebook's learning rates.
SEED_LR = {"sgd": 0.001, "minibatch": 0.001, "gd": 0.05}


class ConfigError(UserError, ValueError):
    """A job file or override the user got wrong; the message is one line naming the key."""


@dataclass(frozen=True)
class ModelConfig:
    sizes: tuple[int, ...] = (784, 16, 16, 10)  # layer widths, input first, classes last
    dtype: str = "float32"  # "float32" or "float64" for weights and arithmetic
    # gradient sums of a minibatch: "numpy" (the reference) or "numba" (one compiled loop,
    # equal to numpy within rounding; needs the extra 'fast'); full batches (gd) always numpy
    kernel: str = "numpy"


@dataclass(frozen=True)
class OptimizerConfig:
    name: str = "minibatch"  # "sgd" (per example), "minibatch" or "gd" (full batch)
    lr: float | None = None  # None: the seed's rate (sgd 0.001, minibatch 0.001, gd 0.05)
    batch_size: int = 32  # global examples per minibatch step, whatever the worker count
    sampling: str | None = None  # "shuffle" per epoch, "sample" (seed: random.sample per batch),
    # "sequential" (data order); None: "sequential" for sgd (the seed's order), "shuffle" otherwise
    momentum: float = 0.0  # 0 is the seed's plain SGD

    @property
    def learning_rate(self):
        return SEED_LR[self.name] if self.lr is None else self.lr

    @property
    def sampling_mode(self):
        if self.sampling is not None:
            return self.sampling
        return "sequential" if self.name == "sgd" else "shuffle"


@dataclass(frozen=True)
class DataConfig:
    dataset: str | None = "mnist-sample"  # "mnist-sample" (bundled) or "mnist" (downloaded)
    path: str | None = None  # an IDX directory or a Parquet shard directory/URI; wins over dataset


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # used in the run directory name: letters, digits, _ . - (no "..")
    seed: int = 0  # seeds the initial weights and every sampling draw
    epochs: int | None = None  # passes over the training split (one of epochs / steps)
    steps: int | None = None  # optimizer steps; wins over epochs when both are given
    eval_every: int = 0  # evaluate on the held-out split every N steps (0: only at the end)
    log_every: int = 0  # one progress line every N steps (0: about 20 lines a run)
    run_dir: str | None = None  # default runs/<timestamp>-<name>
    checkpoint_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 3  # checkpoints kept besides the best one
    on_nonfinite: str = "stop"  # "stop" at a NaN/inf loss or gradient, or "skip" the update
    mlflow_uri: str | None = None  # MLflow tracking URI (file:, sqlite:, http:) to log the run to; None: off


@dataclass(frozen=True)
class ClusterConfig:
    workers: int = 2  # worker actors, one shard each (the most asked for); 0: in this process, without Ray
    min_workers: int | None = None  # keep training on as few as this when workers are lost for good
    # (None: cluster.workers, never fewer); the group grows back toward cluster.workers
    address: str | None = None  # None: embedded local Ray; "auto" or an address: join it
    placement: str = "SPREAD"  # placement-group strategy for the workers
    cpus_per_worker: float = 1.0  # CPUs each worker actor reserves
    max_failures: int = 3  # worker failures survived per run; -1 unlimited
    step_timeout_s: float = 60.0  # a step slower than this counts as a worker failure
    replace_timeout_s: float = 30.0  # a lost worker not replaced by then is dropped (or the run stops)
    # step transport: "actors" (weights out, gradients back every step), "mesh" (workers on the
    # driver's node sum each other's gradients through shared memory, many steps per call),
    # "collective" (workers on several nodes exchange them with Ray's collective allgather,
    # many steps per call; needs torch, the extra 'collective'), "auto" (mesh when every worker
    # is on the driver's node, collective when they span nodes and torch is installed, else actors)
    transport: str = "auto"


@dataclass(frozen=True)
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(JobConfig)}


def load_job(path=None, overrides=(), updates=None):
    """JobConfig from a TOML file (or defaults when path is None), `a.b=v` overrides, then
    updates {"section.key": value} (None removes the key, restoring its default)."""
    raw = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such job file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        section, name = key
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{section}: must be a table")
        raw.setdefault(section, {})[name] = value
    for key, value in (updates or {}).items():
        section, name = key.split(".")
        if value is None:
            raw.get(section, {}).pop(name, None)
        else:
            raw.setdefault(section, {})[name] = value
    return job_from_dict(raw, source=str(path) if path else "job")


def parse_override_key(text):
    """'cluster.workers=3' -> ("cluster.workers", 3)."""
    (section, name), value = parse_override(text)
    return f"{section}.{name}", value


def parse_override(text):
    """'optimizer.lr=0.1' -> (("optimizer", "lr"), 0.1). Values are TOML; bare words are strings."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. optimizer.lr=0.1")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return (parts[0], parts[1]), parsed


def job_from_dict(raw, source="job"):
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown table [{sorted(unknown)[0]}]; allowed: {', '.join(SECTIONS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name} must be a table")
        sections[name] = _section_from_dict(cls, name, table)
    job = JobConfig(**sections)
    validate(job)
    return job


def _section_from_dict(cls, section, table):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in table:
        if key not in fields:
            raise ConfigError(f"{section}.{key}: unknown key; allowed: {', '.join(fields)}")
    values = {key: _coerce(f"{section}.{key}", fields[key].type, table[key]) for key in table}
    return cls(**values)


def _coerce(key, typ, value):
    """Check value against the annotated type; ints are accepted for floats, lists for tuples."""
    options = typing.get_args(typ) if isinstance(typ, types.UnionType) else (typ,)
    if value is None and type(None) in options:
        return None
    for option in options:
        origin = typing.get_origin(option)
        if origin is tuple:
            if isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
                return tuple(value)
        elif option is float and (isinstance(value, float) or _is_int(value)):
            return float(value)
        elif option is int and _is_int(value):
            return value
        elif option is str and isinstance(value, str):
            return value
    names = " or ".join(_type_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(typ):
    return "a list of integers" if typing.get_origin(typ) is tuple else typ.__name__


def _require(ok, key, allowed, value):
    if not ok:
        raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")


def validate(job):
    m, o, r, c = job.model, job.optimizer, job.run, job.cluster
    _require(len(m.sizes) >= 2 and all(s >= 1 for s in m.sizes), "model.sizes",
             "need at least two positive widths, e.g. [784, 16, 16, 10]", list(m.sizes))
    _require(m.dtype in DTYPES, "model.dtype", f"allowed: {', '.join(DTYPES)}", m.dtype)
    _require(m.kernel in KERNELS, "model.kernel", f"allowed: {', '.join(KERNELS)}", m.kernel)
    _require(o.name in OPTIMIZERS, "optimizer.name", f"allowed: {', '.join(OPTIMIZERS)}", o.name)
    _require(o.lr is None or 0 < o.lr < float("inf"), "optimizer.lr", "must be a finite number > 0", o.lr)
    _require(o.batch_size >= 1, "optimizer.batch_size", "must be >= 1", o.batch_size)
    _require(o.sampling is None or o.sampling in SAMPLINGS, "optimizer.sampling", f"allowed: {', '.join(SAMPLINGS)}", o.sampling)
    _require(0.0 <= o.momentum < 1.0, "optimizer.momentum", "must be in [0, 1)", o.momentum)
    _require(job.data.dataset is not None or job.data.path is not None, "data.dataset",
             "give data.dataset or data.path", None)
    _require(re.fullmatch(r"[A-Za-z0-9_.-]+", r.name) is not None and ".." not in r.name, "run.name",
             "use letters, digits, _ . - and no '..' (it names the run directory)", r.name)
    _require(r.epochs is None or r.epochs >= 1, "run.epochs", "must be >= 1", r.epochs)
    _require(r.steps is None or r.steps >= 1, "run.steps", "must be >= 1", r.steps)
    for key in ("eval_every", "log_every", "checkpoint_every"):
        _require(getattr(r, key) >= 0, f"run.{key}", "must be >= 0", getattr(r, key))
    _require(r.keep_last >= 1, "run.keep_last", "must be >= 1", r.keep_last)
    _require(r.seed >= 0, "run.seed", "must be >= 0", r.seed)
    _require(r.on_nonfinite in NONFINITE_POLICIES, "run.on_nonfinite",
             f"allowed: {', '.join(NONFINITE_POLICIES)}", r.on_nonfinite)
    _require(c.workers >= 0, "cluster.workers", "must be >= 0 (0: in this process, without Ray)", c.workers)
    _require(c.placement in PLACEMENTS, "cluster.placement", f"allowed: {', '.join(PLACEMENTS)}", c.placement)
    _require(c.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be > 0", c.cpus_per_worker)
    _require(c.max_failures >= -1, "cluster.max_failures", "must be >= -1 (-1: unlimited)", c.max_failures)
    _require(c.step_timeout_s > 0, "cluster.step_timeout_s", "must be > 0", c.step_timeout_s)
    _require(c.replace_timeout_s > 0, "cluster.replace_timeout_s", "must be > 0", c.replace_timeout_s)
    _require(c.min_workers is None or 1 <= c.min_workers <= max(c.workers, 1), "cluster.min_workers",
             f"must be between 1 and cluster.workers ({c.workers})", c.min_workers)
    _require(c.transport in TRANSPORTS, "cluster.transport", f"allowed: {', '.join(TRANSPORTS)}", c.transport)


def replace(job, **sections):
    """A copy of job with some fields changed: replace(job, run={"steps": 10})."""
    changed = {name: dataclasses.replace(getattr(job, name), **values) for name, values in sections.items()}
    new = dataclasses.replace(job, **changed)
    validate(new)
    return new


def to_dict(job):
    """Plain dict (TOML/JSON-friendly; None fields dropped) of the resolved job."""
    def clean(obj):
        if isinstance(obj, dict):
            return {k: clean(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, tuple):
            return list(obj)
        return obj
    return clean(dataclasses.asdict(job))


def to_toml(job):
    lines = []
    for section, table in to_dict(job).items():
        lines.append(f"[{section}]")
        for key, value in table.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _toml_string(text):
    """A TOML basic string: backslash, quote and control characters (newline, DEL, ...) escaped."""
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
