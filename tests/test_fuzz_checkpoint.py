"""Hostile checkpoints: whatever is done to a checkpoint's files, load raises only CheckpointError.

Mutations: flipped bits, truncation and inserted bytes in any file (the manifest included);
Parquet files rewritten with other columns, extra columns, other types, or edited rows; JSON
files with keys removed, added or replaced. Each may be re-signed (the manifest's SHA-256
fixed up) so it gets past the checksums to the schema and value checks. A load that succeeds
must give exactly the shapes and dtypes of its job, all finite.
"""

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmlp import checkpoint, config, trainer
from distmlp.checkpoint import CheckpointError

FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
JOB = config.load_job(None, ["model.sizes=[5, 4, 3]", "model.dtype='float32'", "optimizer.momentum=0.9"])
FILES = (*checkpoint.FILES, "manifest.json")


def _template():
    """{file name: bytes} of one valid checkpoint (params, momentum, counters, metrics)."""
    state = trainer.initial_state(JOB)
    rng = np.random.default_rng(0)
    state.opt_state = {n: rng.normal(size=p.shape).astype(p.dtype) for n, p in state.params.items()}
    state.step, state.samples_seen, state.metrics = 7, 224, {"step": 7, "train_loss": 0.5}
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint.save(Path(tmp) / "ckpt", state, JOB, {"kind": "minibatch"}, epoch=0.25)
        return {name: (Path(path) / name).read_bytes() for name in FILES}


VALID = _template()


def load_mutated(files, resign):
    """Write files as a checkpoint (manifest checksums fixed when resign) and load it."""
    files = dict(files)
    if resign:
        try:
            manifest = json.loads(files["manifest.json"])
            manifest["files"].update({n: hashlib.sha256(files[n]).hexdigest() for n in checkpoint.FILES})
            files["manifest.json"] = json.dumps(manifest).encode()
        except (ValueError, TypeError, KeyError, AttributeError):
            pass  # a manifest mutated past fixing: load must refuse it as it is
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        try:
            ckpt = checkpoint.load(path)
        except CheckpointError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            return None
    shapes = checkpoint.expected_shapes(ckpt.job.model.sizes)
    for group in (ckpt.params, ckpt.opt_state):
        for name, a in group.items():
            assert a.shape == shapes[name] and a.dtype.name == ckpt.job.model.dtype and np.isfinite(a).all()
    return ckpt


def test_the_template_loads():
    ckpt = load_mutated(VALID, resign=False)
    assert ckpt is not None and ckpt.step == 7 and sorted(ckpt.opt_state) == ["W1", "W2", "b1", "b2"]


# ------------------------------------------------------------------------------ raw bytes

BYTE_EDIT = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
)


def edit_bytes(raw, edits):
    raw = bytearray(raw)
    for edit in edits:
        at = int(edit[1] * len(raw))
        if edit[0] == "flip" and at < len(raw):
            raw[at] ^= 1 << edit[2]
        elif edit[0] == "cut":
            del raw[at:]
        elif edit[0] == "insert":
            raw[at:at] = edit[2]
    return bytes(raw)


@FUZZ
@given(name=st.sampled_from(FILES), edits=st.lists(BYTE_EDIT, min_size=1, max_size=4), resign=st.booleans())
def test_byte_mutations_in_any_file_raise_only_checkpoint_error(name, edits, resign):
    mutated = edit_bytes(VALID[name], edits)
    ckpt = load_mutated(VALID | {name: mutated}, resign)
    if ckpt is not None:
        assert resign or mutated == VALID[name], "a changed file passed its checksum"


# ---------------------------------------------------------------------------- Parquet tables

PA_TYPES = [pa.string(), pa.int64(), pa.float64(), pa.float32(), pa.binary(), pa.list_(pa.int64()),
            pa.list_(pa.float64()), pa.list_(pa.float32()), pa.list_(pa.string()), pa.null()]
SCALARS = {
    "string": st.text(max_size=8), "int64": st.integers(-2 ** 63, 2 ** 63 - 1),
    "double": st.floats(allow_nan=True, allow_infinity=True),
    "float": st.floats(width=32, allow_nan=True, allow_infinity=True), "binary": st.binary(max_size=8),
}


def values_of(typ, rows):
    """A strategy for one column of rows values of pyarrow type typ (nulls included)."""
    if pa.types.is_null(typ):
        return st.just([None] * rows)
    if pa.types.is_list(typ):
        item = SCALARS[str(typ.value_type)]
        cell = st.none() | st.lists(item, max_size=6)
    else:
        cell = st.none() | SCALARS[str(typ)]
    return st.lists(cell, min_size=rows, max_size=rows)


@st.composite
def foreign_tables(draw):
    """Tables with the checkpoint's columns or others, in other types, extra or missing."""
    names = draw(st.lists(st.sampled_from(["name", "shape", "dtype", "values", "extra"]),
                          min_size=1, max_size=5, unique=True))
    rows = draw(st.integers(0, 5))
    columns = {}
    for col in names:
        typ = draw(st.sampled_from(PA_TYPES))
        columns[col] = pa.array(draw(values_of(typ, rows)), typ)
    return pa.table(columns)


SHAPES = st.lists(st.sampled_from([-1, 0, 1, 3, 4, 5, 2 ** 31, 2 ** 62]), max_size=3)
FLOATS = st.floats(allow_nan=True, allow_infinity=True, width=64)


@st.composite
def edited_rows(draw, table):
    """The valid table with some cells of some rows replaced (schema kept), rows dropped or doubled."""
    rows = table.to_pylist()
    for row in rows:
        if draw(st.booleans()):
            key = draw(st.sampled_from(["name", "shape", "dtype", "values"]))
            row[key] = draw({"name": st.sampled_from(["W1", "b1", "W2", "b2", "W3", "x", ""]),
                             "shape": SHAPES, "dtype": st.sampled_from(["float32", "float64", "int8", "object", ""]),
                             "values": st.lists(FLOATS, max_size=25)}[key] | st.none())
    order = draw(st.lists(st.integers(0, len(rows) - 1), max_size=len(rows) + 1)) if rows else []
    kept = [rows[i] for i in order] if draw(st.booleans()) else rows
    return pa.Table.from_pylist(kept, schema=checkpoint.ARRAY_SCHEMA)


def parquet_bytes(table):
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def valid_table(name):
    return pq.read_table(pa.BufferReader(VALID[name]))


@FUZZ
@given(name=st.sampled_from(["params.parquet", "optimizer.parquet"]), table=foreign_tables())
def test_foreign_parquet_schemas_raise_only_checkpoint_error(name, table):
    assert load_mutated(VALID | {name: parquet_bytes(table)}, resign=True) is None


@FUZZ
@given(name=st.sampled_from(["params.parquet", "optimizer.parquet"]), data=st.data())
def test_edited_parquet_rows_raise_only_checkpoint_error(name, data):
    table = data.draw(edited_rows(valid_table(name)))
    ckpt = load_mutated(VALID | {name: parquet_bytes(table)}, resign=True)
    if ckpt is not None:  # a re-signed edit that keeps names, shapes and finiteness is a valid file
        arrays = ckpt.params if name == "params.parquet" else ckpt.opt_state
        for row in table.to_pylist():
            assert arrays[row["name"]].ravel().tolist() == np.float32(row["values"]).tolist()


# ------------------------------------------------------------------------------ JSON files

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


@st.composite
def json_edit(draw, obj):
    """obj with one key path (any depth) removed, replaced by any JSON value, or a key added."""
    obj = json.loads(json.dumps(obj))
    node = obj
    while isinstance(node, dict) and node and draw(st.booleans()):
        child = node[draw(st.sampled_from(sorted(node)))]
        if not isinstance(child, dict) or not child:
            break
        node = child
    action = draw(st.sampled_from(["remove", "replace", "add"] if node else ["add"]))
    if action == "add":
        node[draw(st.text(min_size=1, max_size=6))] = draw(JSON_VALUES)
    else:
        key = draw(st.sampled_from(sorted(node)))
        if action == "remove":
            del node[key]
        else:
            node[key] = draw(JSON_VALUES)
    return json.dumps(obj).encode()


@FUZZ
@given(name=st.sampled_from(["state.json", "job.json", "manifest.json"]), data=st.data())
def test_json_edits_raise_only_checkpoint_error(name, data):
    edited = data.draw(json_edit(json.loads(VALID[name])))
    ckpt = load_mutated(VALID | {name: edited}, resign=name != "manifest.json")
    if ckpt is not None and name == "job.json":  # a different but valid job must still fit the arrays
        assert ckpt.job.model.sizes == JOB.model.sizes and ckpt.job.model.dtype == JOB.model.dtype


def test_a_job_key_with_a_newline_gives_a_one_line_error():
    job = json.loads(VALID["job.json"]) | {"line\nbreak": {}}
    assert load_mutated(VALID | {"job.json": json.dumps(job).encode()}, resign=True) is None


def test_deeply_nested_json_is_refused():
    """A re-signed state.json of 100 000 nested lists (json.loads would hit the recursion limit)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    assert load_mutated(VALID | {"state.json": deep}, resign=True) is None
