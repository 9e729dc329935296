"""Hostile files: mutated IDX files (raw and gzip), Parquet shards and manifests only ever raise DataError.

Examples are bounded and derandomized so the whole file runs in well under 30 s and CI is stable.
"""

import gzip
import json
import shutil
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distmlp import data
from distmlp.data import parquet as shards

N = 100
RNG = np.random.default_rng(7)
PIXELS = RNG.integers(0, 256, (N, 784), dtype=np.uint8)
LABELS = RNG.integers(0, 10, N, dtype=np.uint8)
IMAGES = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (N, 28, 28)) + PIXELS.tobytes()
LABELS_FILE = (2049).to_bytes(4, "big") + N.to_bytes(4, "big") + LABELS.tobytes()
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
U32 = st.sampled_from([0, 1, 27, 28, 29, 99, 100, 101, 784, 2 ** 16, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]) | \
    st.integers(0, 2 ** 32 - 1)


def mutation(size, header_fields):
    flip = st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(0, 7))
    cut = st.tuples(st.just("cut"), st.integers(0, size - 1))
    insert = st.tuples(st.just("insert"), st.integers(0, size), st.binary(min_size=1, max_size=64))
    field = st.tuples(st.just("field"), st.integers(0, header_fields - 1), U32)
    byte = st.tuples(st.just("byte"), st.integers(0, 3), st.integers(0, 255))  # magic / type / ndim bytes
    return st.one_of(flip, cut, insert, field, byte)


def apply(raw, mutations):
    raw = bytearray(raw)
    for m in mutations:
        if m[0] == "flip" and m[1] < len(raw):
            raw[m[1]] ^= 1 << m[2]
        elif m[0] == "cut":
            del raw[m[1]:]
        elif m[0] == "insert":
            raw[m[1]:m[1]] = m[2]
        elif m[0] == "field" and 4 * m[1] + 4 <= len(raw):
            raw[4 * m[1]: 4 * m[1] + 4] = m[2].to_bytes(4, "big")
        elif m[0] == "byte" and m[1] < len(raw):
            raw[m[1]] = m[2]
    return bytes(raw)


@pytest.fixture(scope="module")
def scratch():
    directory = Path(tempfile.mkdtemp(prefix="distmlp-fuzz-"))
    yield directory
    shutil.rmtree(directory)


def only_data_errors(call, max_bytes=8 << 20):
    """Run call: it may return or raise DataError, nothing else, and never allocate more than max_bytes."""
    tracemalloc.start()
    try:
        call()
    except data.DataError as e:
        assert "\n" not in str(e)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < max_bytes, f"peak {peak} bytes"


def read_everything(path, magic):
    data.idx_count(path, magic)
    if magic == data.IMAGES_MAGIC:
        x = data.read_images(path, 3, 40)
        assert x.dtype == np.uint8 and x.shape[0] == 37
        data.read_images(path)
    else:
        y = data.read_labels(path)
        assert y.dtype == np.uint8 and int(y.max(initial=0)) <= 9


@pytest.mark.parametrize("role", ["images", "labels"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@FUZZ
@given(st.data())
def test_mutated_idx_raises_only_data_error(scratch, role, gz, draw):
    raw, magic = (IMAGES, data.IMAGES_MAGIC) if role == "images" else (LABELS_FILE, data.LABELS_MAGIC)
    mutations = draw.draw(st.lists(mutation(len(raw), 4 if role == "images" else 2), min_size=1, max_size=3))
    content = apply(raw, mutations)
    path = scratch / f"{role}.idx{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(content, mtime=0) if gz else content)
    only_data_errors(lambda: read_everything(path, magic))


@pytest.mark.parametrize("role", ["images", "labels"])
@FUZZ
@given(st.data())
def test_mutated_gzip_stream_raises_only_data_error(scratch, role, draw):
    raw, magic = (IMAGES, data.IMAGES_MAGIC) if role == "images" else (LABELS_FILE, data.LABELS_MAGIC)
    z = gzip.compress(raw, mtime=0)
    mutations = draw.draw(st.lists(mutation(len(z), 2), min_size=1, max_size=3))
    path = scratch / f"{role}.idx.gz"
    path.write_bytes(apply(z, mutations))
    only_data_errors(lambda: read_everything(path, magic))


# ----------------------------------------------------------------------------- Parquet


@pytest.fixture(scope="module")
def shard_dir(scratch):
    idx_dir = scratch / "idx"
    idx_dir.mkdir()
    for name, raw in (("train-images", IMAGES), ("train-labels", LABELS_FILE),
                      ("test-images", IMAGES), ("test-labels", LABELS_FILE)):
        (idx_dir / name).write_bytes(raw)
    out = scratch / "shards"
    shards.convert(data.resolve(path=str(idx_dir)), out, 2, row_group=16)
    return out


def fresh_copy(shard_dir, scratch):
    target = scratch / "work"
    shutil.rmtree(target, ignore_errors=True)
    return Path(shutil.copytree(shard_dir, target))


def load_all(directory):
    source = data.resolve(path=str(directory))
    x, y = data.load_rows(source.train, 10, 90)
    assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.shape == (80, 784) and len(y) == 80
    data.load_rows(source.test)


@FUZZ
@given(st.data())
def test_mutated_parquet_bytes_raise_only_data_error(shard_dir, scratch, draw):
    work = fresh_copy(shard_dir, scratch)
    path = work / "train-00000-of-00002.parquet"
    raw = path.read_bytes()
    mutations = draw.draw(st.lists(mutation(len(raw), 2), min_size=1, max_size=3))
    path.write_bytes(apply(raw, mutations))
    only_data_errors(lambda: load_all(work), max_bytes=64 << 20)


COLUMN_TYPES = [pa.uint8(), pa.int8(), pa.int64(), pa.float32(), pa.string(), pa.binary(), pa.binary(784),
                pa.list_(pa.uint8()), pa.list_(pa.uint8(), 784), pa.list_(pa.uint8(), 783), pa.list_(pa.int16(), 784),
                pa.list_(pa.float64(), 784), pa.large_list(pa.uint8())]


def column(kind, rows, draw):
    """A column of the given type, filled from the real data where it fits, with optional nulls."""
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind) or pa.types.is_large_list(kind):
        width = kind.list_size if pa.types.is_fixed_size_list(kind) else 784
        values = pa.array(np.resize(PIXELS[:rows], (rows, width)).reshape(-1)).cast(kind.value_type)
        if pa.types.is_fixed_size_list(kind):
            array = pa.FixedSizeListArray.from_arrays(values, width)
        else:
            array = pa.ListArray.from_arrays(pa.array(np.arange(rows + 1) * width, pa.int32()), values).cast(kind)
    elif kind in (pa.binary(784),):
        array = pa.array([bytes(PIXELS[i % N]) for i in range(rows)], kind)
    elif kind in (pa.string(), pa.binary()):
        array = pa.array([str(i) for i in range(rows)]).cast(kind)
    else:
        array = pa.array(draw.draw(st.lists(st.integers(0, 12), min_size=rows, max_size=rows))).cast(kind, safe=False)
    if draw.draw(st.booleans()):
        mask = np.zeros(rows, bool)
        mask[draw.draw(st.integers(0, rows - 1))] = True
        array = pa.array(array.to_pylist(), array.type, mask=mask)
    return array


@FUZZ
@given(st.data())
def test_wrong_schema_shards_raise_only_data_error(shard_dir, scratch, draw):
    work = fresh_copy(shard_dir, scratch)
    rows = draw.draw(st.sampled_from([50, 49, 51, 1]))
    names = draw.draw(st.lists(st.sampled_from(["pixels", "label", "extra", "Pixels"]), min_size=1, max_size=3,
                               unique=True))
    table = pa.table({name: column(draw.draw(st.sampled_from(COLUMN_TYPES)), rows, draw) for name in names})
    pq.write_table(table, work / "train-00000-of-00002.parquet",
                   row_group_size=draw.draw(st.sampled_from([1, 7, 16, 64])))
    only_data_errors(lambda: load_all(work), max_bytes=64 << 20)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2, 2 ** 40) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


@FUZZ
@given(st.data())
def test_mutated_manifest_raises_only_data_error(shard_dir, scratch, draw):
    work = fresh_copy(shard_dir, scratch)
    manifest = json.loads((work / "manifest.json").read_text())
    node, key = manifest, None
    for _ in range(draw.draw(st.integers(1, 4))):
        if isinstance(node, dict) and node:
            key = draw.draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            key = draw.draw(st.integers(0, len(node) - 1))
        else:
            break
        parent, node = node, node[key]
    if key is not None:
        parent[key] = draw.draw(JSON)
    (work / "manifest.json").write_text(json.dumps(manifest))
    only_data_errors(lambda: load_all(work))
