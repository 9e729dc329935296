"""IDX reader, data sets and `distmlp data info`: every bad input is one DataError naming the file."""

import gzip
import io
import json
import time
import tracemalloc

import numpy as np
import pytest
from typer.testing import CliRunner

from distmlp import data
from distmlp.data import idx as idx_format
from distmlp.cli import app


def idx(magic, dims, payload=b""):
    """Bytes of an IDX file: 4-byte magic, one big-endian uint32 per dimension, payload."""
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def images_bytes(n=5, rows=28, cols=28, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (n, rows * cols), dtype=np.uint8)
    return idx(data.IMAGES_MAGIC, [n, rows, cols], pixels.tobytes()), pixels


def labels_bytes(labels):
    return idx(data.LABELS_MAGIC, [len(labels)], bytes(labels))


def write(tmp_path, name, raw, gz):
    path = tmp_path / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


GOOD_IMAGES = images_bytes()[0]
GOOD_LABELS = labels_bytes([3, 1, 4, 1, 5])
HUGE = idx(data.IMAGES_MAGIC, [0xFFFFFFFF] * 3)  # 16 bytes declaring 2^32-1 images of (2^32-1)^2

# case -> (role read as, file content, message fragment (raw), message fragment (.gz))
CASES = {
    "empty file": ("images", b"", "empty file, expected an IDX images file", None),
    "short header": ("images", b"\x00\x00", "header is short: expected 4 bytes, found 2", None),
    "short dimensions": ("images", GOOD_IMAGES[:10], "header is short: expected 12 bytes, found 6", None),
    "not IDX": ("images", b"PK\x03\x04" + GOOD_IMAGES[4:], "not an IDX file (first bytes 504b0304)", None),
    "labels file read as images": ("images", GOOD_LABELS,
                                   "magic 2049 is an IDX labels file, expected images (magic 2051); "
                                   "are the files swapped?", None),
    "images file read as labels": ("labels", GOOD_IMAGES,
                                   "magic 2051 is an IDX images file, expected labels (magic 2049)", None),
    "element type float32": ("images", b"\x00\x00\x0d\x03" + GOOD_IMAGES[4:],
                             "element type 0x0d is not unsigned byte (0x08)", None),
    "element type int32 labels": ("labels", b"\x00\x00\x0c\x01" + GOOD_LABELS[4:],
                                  "element type 0x0c is not unsigned byte (0x08)", None),
    "2 dimensions for images": ("images", idx(0x0802, [5, 784], GOOD_IMAGES[16:]),
                                "2 dimensions, expected 3 for an IDX images file", None),
    "4 dimensions for labels": ("labels", idx(0x0804, [5, 1, 1, 1], bytes(5)),
                                "4 dimensions, expected 1 for an IDX labels file", None),
    "empty image size": ("images", idx(data.IMAGES_MAGIC, [5, 0, 28]), "image size 0x28 is empty", None),
    "payload short": ("images", GOOD_IMAGES[:-1],
                      "payload is short: header declares 3920 bytes, file has 3919",
                      "payload is short: expected 3920 bytes, found 3919"),
    "trailing bytes": ("images", GOOD_IMAGES + b"\x00\x00",
                       "2 trailing bytes after the declared payload", "trailing bytes after the declared payload"),
    "labels payload short": ("labels", GOOD_LABELS[:-2],
                             "payload is short: header declares 5 bytes, file has 3",
                             "payload is short: expected 5 bytes, found 3"),
    "label outside 0..9": ("labels", labels_bytes([3, 1, 4, 10, 5]), "label 10 at index 3 is outside 0..9", None),
    "label 255": ("labels", labels_bytes([255]), "label 255 at index 0 is outside 0..9", None),
    "huge header": ("images", HUGE, "payload is short: header declares "
                    f"{0xFFFFFFFF ** 3} bytes, file has 0",
                    f"header declares {0xFFFFFFFF ** 3} bytes of payload, more than a"),
}


def read(role, path):
    return data.read_images(path) if role == "images" else data.read_labels(path)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_idx_is_one_line_naming_the_file(tmp_path, case, gz):
    role, content, message, gz_message = CASES[case]
    path = write(tmp_path, f"{role}-idx", content, gz)
    with pytest.raises(data.DataError) as e:
        read(role, path)
    text = str(e.value)
    assert text.startswith(f"{path}: ")
    assert (gz_message if gz and gz_message else message) in text
    assert "\n" not in text


def test_error_table_for_the_report(tmp_path):
    """Prints case -> message for raw and .gz (pytest -s shows it); every case raises DataError."""
    rows = []
    for case, (role, content, _, _) in CASES.items():
        for gz in (False, True):
            path = write(tmp_path, f"{role}-idx", content, gz)
            with pytest.raises(data.DataError) as e:
                read(role, path)
            rows.append(f"| {case}{' (.gz)' if gz else ''} | `{str(e.value).replace(str(tmp_path), '…')}` |")
    print("\n".join(rows))
    assert len(rows) == 2 * len(CASES)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("reader", ["read_images", "idx_count"])
def test_huge_header_refused_fast_and_small(tmp_path, gz, reader):
    path = write(tmp_path, "images-idx", HUGE, gz)
    call = {"read_images": lambda: data.read_images(path),
            "idx_count": lambda: data.idx_count(path, data.IMAGES_MAGIC)}[reader]
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(data.DataError, match="header declares"):
        call()
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert elapsed < 0.05, f"{elapsed * 1e3:.1f} ms"
    assert peak < 1 << 20, f"{peak} bytes"


class CountingFile(io.RawIOBase):
    """A read-only file that counts the bytes taken from it."""

    def __init__(self, path):
        self.f = open(path, "rb")
        self.taken = 0

    def readable(self):
        return True

    def readinto(self, b):
        n = self.f.readinto(b)
        self.taken += n
        return n

    def close(self):
        self.f.close()
        super().close()


def test_gzip_inflating_past_its_header_is_refused_without_inflating_it_all(tmp_path, monkeypatch):
    # header declares 10 labels; the stream then inflates to 10 + 64 MiB of zeros (~65 KB compressed)
    path = tmp_path / "labels-idx.gz"
    z = zlib_gzip_stream(labels_bytes([1] * 10), zeros=64 << 20)
    path.write_bytes(z)
    files = []

    def counting_open(p):
        files.append(CountingFile(p))
        return gzip.GzipFile(fileobj=files[-1], mode="rb")

    monkeypatch.setattr(idx_format, "_open", counting_open)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(data.DataError, match="trailing bytes after the declared payload"):
        data.read_labels(path)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert files[0].taken < len(z) // 4, f"read {files[0].taken} of {len(z)} compressed bytes"
    assert peak < 4 << 20, f"{peak} bytes"
    assert elapsed < 0.1, f"{elapsed * 1e3:.1f} ms"


def zlib_gzip_stream(head, zeros):
    """A gzip member holding head followed by `zeros` zero bytes, compressed without building them."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as g:
        g.write(head)
        block = bytes(1 << 20)
        for _ in range(zeros >> 20):
            g.write(block)
    return out.getvalue()


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_row_ranges_equal_slices_of_the_whole(tmp_path, gz):
    raw, pixels = images_bytes(n=50)
    path = write(tmp_path, "images-idx", raw, gz)
    np.testing.assert_array_equal(data.read_images(path), pixels)
    for start, stop in [(0, 1), (7, 23), (49, 50), (0, 50), (20, 20)]:
        np.testing.assert_array_equal(data.read_images(path, start, stop), pixels[start:stop])
    with pytest.raises(data.DataError, match=r"rows \[40, 51\) outside the 50 rows"):
        data.read_images(path, 40, 51)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(data.DataError, match="no such file"):
        data.read_images(tmp_path / "nope")
    with pytest.raises(data.DataError, match="is a directory"):
        data.read_images(tmp_path)


def test_corrupt_gzip_stream(tmp_path):
    z = bytearray(gzip.compress(GOOD_IMAGES))
    (tmp_path / "notgz.gz").write_bytes(GOOD_IMAGES)
    with pytest.raises(data.DataError, match="notgz.gz: cannot read header: Not a gzipped file"):
        data.read_images(tmp_path / "notgz.gz")
    (tmp_path / "cut.gz").write_bytes(bytes(z[: len(z) // 2]))
    with pytest.raises(data.DataError, match="cut.gz: cannot read payload"):
        data.read_images(tmp_path / "cut.gz")
    z[len(z) // 2] ^= 0xFF
    (tmp_path / "flip.gz").write_bytes(bytes(z))
    with pytest.raises(data.DataError, match="flip.gz: "):
        data.read_images(tmp_path / "flip.gz")


def make_dir(tmp_path, names, n_train=6, n_test=4, gz=True):
    """An IDX data directory with the given file names for (train-images, train-labels, test-...)."""
    tr, tr_px = images_bytes(n_train, seed=1)
    te, te_px = images_bytes(n_test, seed=2)
    tr_y, te_y = [i % 10 for i in range(n_train)], [9 - i % 10 for i in range(n_test)]
    for name, raw in zip(names, [tr, labels_bytes(tr_y), te, labels_bytes(te_y)]):
        write(tmp_path, name, raw, gz)
    return tr_px, np.array(tr_y, np.uint8), te_px, np.array(te_y, np.uint8)


@pytest.mark.parametrize("names,gz", [
    (["train-images", "train-labels", "test-images", "test-labels"], False),
    (["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
      "t10k-labels-idx1-ubyte"], True),
], ids=["seed-names", "standard-names-gz"])
def test_directory_with_seed_or_standard_names(tmp_path, names, gz):
    tr_px, tr_y, te_px, te_y = make_dir(tmp_path, names, gz=gz)
    source = data.resolve(path=str(tmp_path))
    x, y = data.load_rows(source.train)
    np.testing.assert_array_equal(x, tr_px)
    np.testing.assert_array_equal(y, tr_y)
    x, y = data.load_rows(source.test, 1, 3)
    np.testing.assert_array_equal(x, te_px[1:3])
    np.testing.assert_array_equal(y, te_y[1:3])
    with pytest.raises(data.DataError, match=r"rows \[2, 5\) outside the split's 4 rows"):
        data.load_rows(source.test, 2, 5)


def test_count_mismatch_names_both_files(tmp_path):
    make_dir(tmp_path, ["train-images", "train-labels", "test-images", "test-labels"], gz=False)
    write(tmp_path, "train-labels", labels_bytes([1, 2, 3]), False)
    with pytest.raises(data.DataError) as e:
        data.resolve(path=str(tmp_path))
    assert str(e.value) == f"{tmp_path}/train-images: 6 images but {tmp_path}/train-labels has 3 labels"


def test_missing_role_file(tmp_path):
    make_dir(tmp_path, ["train-images", "train-labels", "test-images", "test-labels"], gz=False)
    (tmp_path / "test-labels").unlink()
    with pytest.raises(data.DataError, match="no test-labels file"):
        data.resolve(path=str(tmp_path))


def test_bundled_sample_split_is_8000_2000_of_the_real_file():
    source = data.resolve("mnist-sample")
    assert (source.train.count, source.test.count) == (8000, 2000)
    whole = data.read_images(source.train.images)
    x, y = data.load_rows(source.test, 0, 5)
    np.testing.assert_array_equal(x, whole[8000:8005])
    assert y.tolist() == data.read_labels(source.train.labels)[8000:8005].tolist()


def test_named_data_sets(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTMLP_DATA", str(tmp_path))
    assert data.cache_dir() == tmp_path
    with pytest.raises(data.DataError) as e:
        data.resolve("mnist")
    assert "run `distmlp data download mnist`" in str(e.value) and str(tmp_path / "mnist") in str(e.value)
    with pytest.raises(data.DataError, match="unknown data set 'fashion'"):
        data.resolve("fashion")
    (tmp_path / "mnist").mkdir()
    make_dir(tmp_path / "mnist", ["train-images", "train-labels", "test-images", "test-labels"])
    assert data.resolve("mnist").name == "mnist"


@pytest.mark.parametrize("n,k", [(10, 3), (7, 7), (5, 8), (60000, 4), (0, 2)])
def test_shard_bounds_cover_contiguously(n, k):
    bounds = data.shard_bounds(n, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


runner = CliRunner()


def test_cli_info_text_and_json():
    result = runner.invoke(app, ["data", "info", "--dataset", "mnist-sample"])
    assert result.exit_code == 0, result.output
    assert "8000 images of 28x28" in result.output and "2000 images" in result.output
    result = runner.invoke(app, ["data", "info", "--dataset", "mnist-sample", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output.strip().splitlines()[-1])
    assert info["name"] == "mnist-sample"
    assert info["train"]["count"] == 8000 and info["test"]["count"] == 2000
    assert info["train"]["image_shape"] == [28, 28]
    assert sum(info["train"]["labels"]) == 8000 and len(info["test"]["labels"]) == 10
    assert info["test"]["labels"] == np.bincount(data.load_rows(data.bundled_sample().test)[1]).tolist()


@pytest.mark.parametrize("args,message", [
    ([], "give --data DIR or --dataset NAME"),
    (["--dataset", "nope"], "unknown data set 'nope'"),
    (["--data", "/no/such/dir"], "/no/such/dir: no such data directory"),
    (["--data", "x", "--dataset", "mnist-sample"], "give either --data or --dataset, not both"),
])
def test_cli_info_user_errors(args, message):
    result = runner.invoke(app, ["data", "info", *args])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {message}" or message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_resolve_needs_something():
    with pytest.raises(data.DataError, match="no data set given: pass --data DIR or --dataset NAME"):
        data.resolve()


def test_summary_of_a_run_on_a_data_directory_names_the_directory_not_the_default_data_set(tmp_path):
    """data.path wins over data.dataset, whose default stays beside it: the summary names only the path."""
    from distmlp import config, driver
    (tmp_path / "idx").mkdir()
    make_dir(tmp_path / "idx", ["train-images", "train-labels", "test-images", "test-labels"], gz=False)
    job = config.load_job(None, ["cluster.workers=0", "run.steps=2", "optimizer.batch_size=2"],
                          {"run.run_dir": str(tmp_path / "run"), "data.path": str(tmp_path / "idx"), "data.dataset": None})
    summary = driver.run_job(job, echo=lambda line: None)
    assert (summary["dataset"], summary["data_path"], summary["steps"]) == (None, str(tmp_path / "idx"), 2)
