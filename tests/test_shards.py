"""Parquet shards: convert, read any row range from a path or file:// URI, refuse bad files."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from distmlp import data
from distmlp.data import parquet as shards
from distmlp.cli import app

ROW_GROUP = 500


@pytest.fixture(scope="module")
def sample():
    source = data.bundled_sample()
    return source, {name: data.load_rows(getattr(source, name)) for name in ("train", "test")}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, sample):
    out = tmp_path_factory.mktemp("shards") / "mnist-sample"
    shards.convert(sample[0], out, 3, row_group=ROW_GROUP)
    return out


@pytest.fixture
def copy(converted, tmp_path):
    """A private copy of the converted shards that a test may damage."""
    return shutil.copytree(converted, tmp_path / "copy")


def test_manifest_describes_the_files(converted):
    m = json.loads((converted / "manifest.json").read_text())
    assert (m["format"], m["version"], m["image_shape"], m["name"]) == ("distmlp-shards", 1, [28, 28], "mnist-sample")
    assert [f["rows"] for f in m["splits"]["train"]["files"]] == [2667, 2667, 2666]
    assert [f["rows"] for f in m["splits"]["test"]["files"]] == [667, 667, 666]
    names = sorted(p.name for p in converted.iterdir())
    assert names == sorted(["manifest.json"] + [f"{s}-{i:05d}-of-00003.parquet" for s in ("train", "test")
                                                 for i in range(3)])
    for f in m["splits"]["train"]["files"]:
        pf = pq.ParquetFile(converted / f["name"])
        assert pf.metadata.num_rows == f["rows"]
        assert [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)][0] == ROW_GROUP
        assert str(pf.schema_arrow) == "pixels: fixed_size_binary[784] not null\nlabel: uint8 not null"
    assert shards.verify(str(converted)) == 6


# ranges straddling the file boundaries (2667, 5334) and the 500-row row groups
RANGES = [(0, 8000), (2666, 2668), (499, 501), (10, 6000), (5333, 5335), (7999, 8000), (1234, 1234), (2667, 5334)]


@pytest.mark.parametrize("as_uri", [False, True], ids=["path", "file-uri"])
@pytest.mark.parametrize("start,stop", RANGES)
def test_rows_equal_the_idx_rows(converted, sample, as_uri, start, stop):
    source = data.resolve(path=converted.as_uri() if as_uri else str(converted))
    assert (source.train.kind, source.train.count, source.test.count) == ("parquet", 8000, 2000)
    x, y = data.load_rows(source.train, start, stop)
    assert x.dtype == np.uint8 and y.dtype == np.uint8 and x.shape == (stop - start, 784)
    np.testing.assert_array_equal(x, sample[1]["train"][0][start:stop])
    np.testing.assert_array_equal(y, sample[1]["train"][1][start:stop])


def test_test_split_and_split_offsets(converted, sample):
    source = data.resolve(path=str(converted))
    x, y = data.load_rows(source.test)
    np.testing.assert_array_equal(x, sample[1]["test"][0])
    np.testing.assert_array_equal(y, sample[1]["test"][1])
    sub = shards.ParquetSplit(str(converted), "test", 600, 100)  # rows 600..700 straddle a file
    np.testing.assert_array_equal(data.load_rows(sub, 50, 90)[1], sample[1]["test"][1][650:690])


def test_a_range_inside_one_file_reads_only_that_file(copy, sample):
    for name in ("train-00000-of-00003.parquet", "train-00002-of-00003.parquet"):
        (copy / name).write_bytes(b"garbage")
    source = data.resolve(path=str(copy))
    x, _ = data.load_rows(source.train, 2667, 5334)
    np.testing.assert_array_equal(x, sample[1]["train"][0][2667:5334])
    with pytest.raises(data.DataError, match=r"train-00000-of-00003.parquet: .*"):
        data.load_rows(source.train, 2600, 2700)


def test_a_range_reads_only_the_row_groups_it_needs(converted, monkeypatch):
    read = []
    original = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, **kw: read.append(i) or original(self, i, **kw))
    source = data.resolve(path=str(converted))
    data.load_rows(source.train, 2667 + 1100, 2667 + 1600)  # rows 1100..1600 of file 1: groups 2, 3
    assert read == [2, 3]


def test_flipped_byte_in_the_rows_read_is_caught(copy):
    path = copy / "test-00001-of-00003.parquet"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    path.write_bytes(bytes(raw))
    source = data.resolve(path=str(copy))
    with pytest.raises(data.DataError, match=f"{path}: "):
        data.load_rows(source.test)
    with pytest.raises(data.DataError, match=f"{path}: sha256 [0-9a-f]{{64}} does not match the manifest's"):
        shards.verify(str(copy))


def rewrite(path, table):
    pq.write_table(table, path)


def small_table(pixels_type=None, label_type=pa.uint8(), extra=False, label=1, rows=2667):
    x = np.zeros((rows, 784), np.uint8)
    px = pa.array([bytes(784)] * rows, pa.binary(784))
    if pixels_type is not None:
        px = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 784).cast(pixels_type)
    cols = {"pixels": px, "label": pa.array(np.full(rows, label, np.uint8)).cast(label_type)}
    if extra:
        cols["extra"] = pa.array(np.zeros(rows, np.int8))
    return pa.table(cols)


@pytest.mark.parametrize("table,message", [
    (lambda: small_table(extra=True), r"columns \(pixels: .*, label: uint8, extra: int8\), expected"),
    (lambda: small_table(label_type=pa.int64()), r"columns \(.*label: int64\), expected"),
    (lambda: small_table(pixels_type=pa.list_(pa.uint8())), r"columns \(pixels: list<.*\), expected"),
    (lambda: small_table(pixels_type=pa.list_(pa.uint8(), 784)), r"columns \(pixels: fixed_size_list<.*uint8>"),
    (lambda: small_table().set_column(0, "pixels", pa.array([bytes(783)] * 2667, pa.binary(783))),
     r"columns \(pixels: fixed_size_binary\[783\], label: uint8\), expected \(pixels: fixed_size_binary\[784\]"),
    (lambda: small_table(label=12), r"label 12 at index 0 is outside 0..9"),
    (lambda: small_table(rows=10), r"10 rows, the manifest says 2667"),
    (lambda: small_table().select(["label", "pixels"]), r"columns \(label: uint8, pixels"),
], ids=["extra column", "int64 labels", "variable list", "uint8 list", "783 bytes", "bad label", "row count",
        "column order"])
def test_bad_shard_file_names_the_file(copy, table, message):
    path = copy / "train-00000-of-00003.parquet"
    rewrite(path, table())
    with pytest.raises(data.DataError, match=f"{path}: {message}"):
        data.load_rows(data.resolve(path=str(copy)).train, 0, 10)


def test_truncated_and_null_shards(copy):
    path = copy / "train-00000-of-00003.parquet"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match=f"{path}: "):
        data.load_rows(data.resolve(path=str(copy)).train, 0, 10)
    t = small_table()
    nulls = pa.array([None] + [1] * 2666, pa.uint8())
    rewrite(path, pa.table({"pixels": t.column("pixels"), "label": nulls}))
    with pytest.raises(data.DataError, match=f"{path}: null values in rows"):
        data.load_rows(data.resolve(path=str(copy)).train, 0, 10)


def edit_manifest(copy, edit):
    m = json.loads((copy / "manifest.json").read_text())
    edit(m)
    (copy / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.update(version=2), "format version 2, this distmlp reads 1"),
    (lambda m: m.update(format="other"), "not a distmlp shard manifest"),
    (lambda m: m["splits"].pop("test"), "splits must be exactly train, test"),
    (lambda m: m.update(image_shape=[28]), r"image_shape \[28\] is not \[rows, cols\] of 1..4096"),
    (lambda m: m["splits"]["train"].update(rows=9000), "file rows add up to 8000, not 9000"),
    (lambda m: m["splits"]["train"]["files"][0].update(name="../../etc/passwd"), "is not a plain file name"),
    (lambda m: m["splits"]["train"]["files"][0].update(rows=True), "needs name, rows, sha256"),
    (lambda m: m["splits"]["train"]["files"][0].update(rows=(1 << 32) // 785 + 1),
     f"file train-00000-of-00003.parquet declares {(1 << 32) // 785 + 1} rows of 784 pixels, more than the "
     f"{(1 << 32) - 1} bytes distmlp reads from one file"),
], ids=["version", "format", "missing split", "image shape", "rows sum", "path escape", "bool rows",
        "rows over the size limit"])
def test_bad_manifest_names_it(copy, edit, message):
    edit_manifest(copy, edit)
    with pytest.raises(data.DataError, match=f"{copy}/manifest.json: .*{message}"):
        data.resolve(path=str(copy))


def test_manifest_not_json_or_missing(copy, tmp_path):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(data.DataError, match="manifest.json: not valid JSON"):
        data.resolve(path=str(copy))
    with pytest.raises(data.DataError, match="manifest.json: "):
        data.resolve(path=(tmp_path / "nowhere").as_uri())


def test_convert_refuses_existing_output_and_too_many_shards(converted, tmp_path, sample):
    with pytest.raises(data.DataError, match="already exists"):
        shards.convert(sample[0], converted, 2)
    with pytest.raises(data.DataError, match="--shards 2001 is more than the 2000 rows of split test"):
        shards.convert(sample[0], tmp_path / "many", 2001)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_convert_leaves_nothing(tmp_path, sample, monkeypatch):
    calls = []
    original = shards._write_shard

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        original(*args)

    monkeypatch.setattr(shards, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        shards.convert(sample[0], tmp_path / "out", 2)
    assert list(tmp_path.iterdir()) == []


runner = CliRunner()


def test_cli_convert_then_info(tmp_path):
    out = tmp_path / "cli-shards"
    result = runner.invoke(app, ["data", "convert", "--dataset", "mnist-sample", "--shards", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "train: 8000 rows in 2 files" in result.output
    result = runner.invoke(app, ["data", "info", "--data", out.as_uri(), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["verified_files"] == 4 and info["train"]["count"] == 8000
    result = runner.invoke(app, ["data", "convert", "--dataset", "mnist-sample", "--shards", "2", "-o", str(out)])
    assert result.exit_code == 2 and "already exists" in result.stderr
