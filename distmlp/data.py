"""Data sets: IDX parsing, the bundled sample, the download cache, and row ranges for shards.

Images stay uint8 in memory and are scaled by 1/255 only where a batch is used
(mlp.scale_pixels): 60,000 x 784 MNIST is 47 MB as uint8 but 188 MB as float32 and
376 MB as float64, per copy, and every worker would pay that.

A data set is described by a DataSource of two Splits (train, held-out) that are plain,
picklable descriptions (paths and row ranges), so a worker actor is sent the description
and loads only its own rows.
"""

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmlp.errors import UserError

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
UNSIGNED_BYTE = 0x08
NUM_CLASSES = 10
_CHUNK = 1 << 20

BUNDLED_DIR = Path(__file__).parent / "datasets"
SAMPLE_TRAIN_ROWS = 8000  # mnist-sample: rows [0, 8000) train, [8000, 10000) held out

# File names looked for in a data directory, per role: the seed's names, then the standard ones.
FILE_NAMES = {
    "train-images": ["train-images", "train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    "train-labels": ["train-labels", "train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    "test-images": ["test-images", "t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    "test-labels": ["test-labels", "t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
}


class DataError(UserError, ValueError):
    """A data file or data set the user pointed at is missing or malformed (one-line message)."""


@dataclass(frozen=True)
class Split:
    """Rows [offset, offset + count) of a pair of IDX files, or of a Parquet shard directory."""

    kind: str  # "idx" or "parquet"
    images: str  # idx: the images file; parquet: the directory (local path or URI)
    labels: str | None  # idx: the labels file; parquet: the split name ("train" / "test")
    offset: int
    count: int


@dataclass(frozen=True)
class DataSource:
    name: str
    train: Split
    test: Split


# ---------------------------------------------------------------------------------- IDX


def _open(path):
    path = str(path)
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None


def _read_exact(f, n, path, what):
    """Read exactly n bytes in bounded chunks; a short read is a DataError, never a huge alloc."""
    parts, got = [], 0
    try:
        while got < n:
            chunk = f.read(min(_CHUNK, n - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from None
    if got < n:
        raise DataError(f"{path}: {what} is short: expected {n} bytes, found {got}")
    return b"".join(parts)


def _read_header(f, path, magic, ndim):
    """Parse and check the IDX header; returns the declared dimensions as Python ints."""
    head = _read_exact(f, 4, path, "header")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (first bytes {head.hex()})")
    found = int.from_bytes(head, "big")
    if head[2] != UNSIGNED_BYTE:
        raise DataError(f"{path}: element type 0x{head[2]:02x} is not unsigned byte (0x08)")
    if found != magic:
        role = "images" if magic == IMAGES_MAGIC else "labels"
        raise DataError(f"{path}: magic number {found}, expected {magic} for {role} "
                        f"({head[3]} dimensions, expected {ndim})")
    dims_bytes = _read_exact(f, 4 * ndim, path, "header")
    return [int.from_bytes(dims_bytes[4 * i: 4 * i + 4], "big") for i in range(ndim)]


def _check_size(path, header_bytes, payload):
    """For an uncompressed file, compare the declared payload with the file size up front."""
    if str(path).endswith(".gz"):
        return
    actual = os.path.getsize(path) - header_bytes
    if actual < payload:
        raise DataError(f"{path}: payload is short: header declares {payload} bytes, file has {actual}")
    if actual > payload:
        raise DataError(f"{path}: {actual - payload} trailing bytes after the declared payload")


def _skip(f, n, path, what):
    if n == 0:
        return
    if hasattr(f, "seekable") and f.seekable() and not isinstance(f, gzip.GzipFile):
        f.seek(n, os.SEEK_CUR)
    else:
        while n:
            got = len(_read_exact(f, min(_CHUNK, n), path, what))
            n -= got


def read_idx(path, magic, start=0, stop=None):
    """Rows [start, stop) of an IDX file of unsigned bytes, validated; (rows, row_size) uint8.

    Reads the whole remaining file to check there are no trailing bytes only when the
    range reaches the end; the declared size is checked against the real one before any
    allocation, in Python integers.
    """
    ndim = 3 if magic == IMAGES_MAGIC else 1
    with _open(path) as f:
        dims = _read_header(f, path, magic, ndim)
        n = dims[0]
        row = 1
        for d in dims[1:]:
            row *= d
        _check_size(path, 4 + 4 * ndim, n * row)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise DataError(f"{path}: rows [{start}, {stop}) outside the {n} rows it holds")
        _skip(f, start * row, path, "payload")
        payload = _read_exact(f, (stop - start) * row, path, "payload")
        if stop == n:
            try:
                extra = f.read(1)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise DataError(f"{path}: cannot read payload: {e}") from None
            if extra:
                raise DataError(f"{path}: trailing bytes after the declared payload")
    return np.frombuffer(payload, dtype=np.uint8).reshape(stop - start, row)


def idx_count(path, magic):
    """The number of items an IDX file declares (reads the header only)."""
    ndim = 3 if magic == IMAGES_MAGIC else 1
    with _open(path) as f:
        dims = _read_header(f, path, magic, ndim)
        row = 1
        for d in dims[1:]:
            row *= d
        _check_size(path, 4 + 4 * ndim, dims[0] * row)
    return dims[0]


def read_images(path, start=0, stop=None):
    return read_idx(path, IMAGES_MAGIC, start, stop)


def read_labels(path, start=0, stop=None, num_classes=NUM_CLASSES):
    labels = read_idx(path, LABELS_MAGIC, start, stop).reshape(-1)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: label {labels[i]} at index {start + i} is outside 0..{num_classes - 1}")
    return labels


# ---------------------------------------------------------------------- data sets


def find_file(directory, role):
    """The file for role ("train-images", ...) in directory, under any known name, raw or .gz."""
    directory = Path(directory)
    for name in FILE_NAMES[role]:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return str(candidate)
    names = ", ".join(FILE_NAMES[role])
    raise DataError(f"{directory}: no {role} file (looked for {names}, raw or .gz)")


def idx_split(images, labels, offset=0, count=None):
    n_images = idx_count(images, IMAGES_MAGIC)
    n_labels = idx_count(labels, LABELS_MAGIC)
    if n_images != n_labels:
        raise DataError(f"{images}: {n_images} images but {labels} has {n_labels} labels")
    count = n_images - offset if count is None else count
    return Split("idx", str(images), str(labels), offset, count)


def from_directory(directory, name=None):
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such data directory")
    if (directory / "manifest.json").is_file():
        from distmlp import shards
        return shards.source(str(directory))
    train = idx_split(find_file(directory, "train-images"), find_file(directory, "train-labels"))
    test = idx_split(find_file(directory, "test-images"), find_file(directory, "test-labels"))
    return DataSource(name or str(directory), train, test)


def bundled_sample():
    directory = BUNDLED_DIR / "mnist-sample"
    images = directory / "t10k-images-idx3-ubyte.gz"
    labels = directory / "t10k-labels-idx1-ubyte.gz"
    total = idx_split(images, labels)
    train = Split("idx", str(images), str(labels), 0, SAMPLE_TRAIN_ROWS)
    test = Split("idx", str(images), str(labels), SAMPLE_TRAIN_ROWS, total.count - SAMPLE_TRAIN_ROWS)
    return DataSource("mnist-sample", train, test)


def cache_dir():
    """Where downloaded data sets live: $DISTMLP_DATA, else the user's cache directory."""
    if os.environ.get("DISTMLP_DATA"):
        return Path(os.environ["DISTMLP_DATA"])
    import platformdirs
    return Path(platformdirs.user_cache_dir("distmlp")) / "data"


DATASETS = ("mnist-sample", "mnist")


def resolve(dataset=None, path=None):
    """DataSource for a directory / URI (path wins) or a named data set."""
    if path is not None:
        if "://" in str(path):
            from distmlp import shards
            return shards.source(str(path))
        return from_directory(path)
    if dataset == "mnist-sample":
        return bundled_sample()
    if dataset == "mnist":
        directory = cache_dir() / "mnist"
        try:
            return from_directory(directory, name="mnist")
        except DataError:
            raise DataError(f"data set 'mnist' is not in {directory}: run `distmlp data download mnist`, "
                            "or pass --data DIR, or use --dataset mnist-sample") from None
    raise DataError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)} (or pass --data DIR)")


def load_rows(split, start=0, stop=None):
    """Rows [start, stop) of a split: (images uint8 (n, 784), labels uint8 (n,))."""
    stop = split.count if stop is None else stop
    if split.kind == "parquet":
        from distmlp import shards
        return shards.load_rows(split, start, stop)
    lo, hi = split.offset + start, split.offset + stop
    return read_images(split.images, lo, hi), read_labels(split.labels, lo, hi)


def shard_bounds(n, k):
    """k contiguous (start, stop) ranges covering range(n); the first n % k are one longer."""
    base, extra = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds
