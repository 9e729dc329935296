"""Data sets: resolve a name or a path to a DataSource, load any row range of one of its splits.

    source.py    DataSource, DataError, the per-file size limit, the label check, shard ranges, digests, cache
    idx.py       IDX files (raw or .gz) and IdxSplit, rows of an images/labels pair
    parquet.py   Parquet shard directories (convert, manifest, row-range reads, verify) and ParquetSplit
    download.py  `distmlp data download`: the official files from https mirrors, checksum-verified

This module is the face; the others import only source.py, never this one. A split is a small
frozen description that knows how to read its rows, so a worker actor is sent the split and
loads only its own rows.
"""

from pathlib import Path

import numpy as np

from distmlp.data import idx
# the face's names: what callers use, wherever it is defined
from distmlp.data.idx import IMAGES_MAGIC, LABELS_MAGIC, IdxSplit, idx_count, read_images, read_labels  # noqa: F401
from distmlp.data.source import NUM_CLASSES, DataError, DataSource, cache_dir, shard_bounds  # noqa: F401

BUNDLED_DIR = Path(__file__).parent.parent / "datasets"
SAMPLE_TRAIN_ROWS = 8000  # mnist-sample: rows [0, 8000) train, [8000, 10000) held out
DATASETS = ("mnist-sample", "mnist")


def from_directory(directory, name=None):
    """Parquet shards if the directory (local or a URI) holds a manifest.json, else its four IDX files."""
    if "://" in str(directory) or (Path(directory) / "manifest.json").is_file():
        from distmlp.data import parquet  # pyarrow (~0.5 s to import) loads only for Parquet data
        return parquet.source(str(directory))
    if not Path(directory).is_dir():
        raise DataError(f"{directory}: no such data directory")
    return idx.source(directory, name or str(directory))


def bundled_sample():
    directory = BUNDLED_DIR / "mnist-sample"
    images, labels = directory / "t10k-images-idx3-ubyte.gz", directory / "t10k-labels-idx1-ubyte.gz"
    return DataSource("mnist-sample", idx.split(images, labels, 0, SAMPLE_TRAIN_ROWS),
                      idx.split(images, labels, SAMPLE_TRAIN_ROWS))


def resolve(dataset=None, path=None):
    """DataSource for a directory / URI (path wins) or a named data set."""
    if path is not None:
        return from_directory(path)
    if dataset is None:
        raise DataError("no data set given: pass --data DIR or --dataset NAME (mnist-sample, mnist)")
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


def image_shape(split):
    """(rows, cols) of one image in a split."""
    return split.image_shape()


def describe(source):
    """Counts, image shape and label histogram of each split, as plain JSON-able values."""
    out = {"name": source.name}
    verified = source.train.verify()
    if verified is not None:
        out["verified_files"] = verified
    for name, split in (("train", source.train), ("test", source.test)):
        _, labels = load_rows(split)
        out[name] = {"count": split.count, "image_shape": list(split.image_shape()),
                     "labels": np.bincount(labels, minlength=NUM_CLASSES).tolist()}
    return out


def load_rows(split, start=0, stop=None):
    """Rows [start, stop) of a split: (images uint8 (n, 784), labels uint8 (n,))."""
    stop = split.count if stop is None else stop
    if not 0 <= start <= stop <= split.count:
        raise DataError(f"{split.where}: rows [{start}, {stop}) outside the split's {split.count} rows")
    return split.read(start, stop)
