"""What every data format shares: DataSource, DataError, the size limit, the label check, shard ranges, digests.

A split is a small frozen description (IdxSplit in idx.py, ParquetSplit in parquet.py) with
`offset`, `count`, `where` (the path its errors name), `image_shape()`, `read(start, stop)` and
`verify()`, so a worker actor is sent the description and loads only its own rows.
"""

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmlp.errors import UserError

NUM_CLASSES = 10
# The most bytes one data file (an IDX file, a Parquet shard) may decode to: 4 GiB - 1, the
# largest size a gzip trailer states exactly (MNIST's 60,000 training images are 47 MB).
MAX_FILE_BYTES = (1 << 32) - 1


class DataError(UserError, ValueError):
    """A data file or data set the user pointed at is missing or malformed (one-line message)."""


@dataclass(frozen=True)
class DataSource:
    name: str
    train: object  # an IdxSplit or a ParquetSplit
    test: object


def check_labels(labels, where, start=0):
    """Refuse a label outside 0..num_classes-1, naming where it is."""
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{where}: label {labels[i]} at index {start + i} is outside 0..{NUM_CLASSES - 1}")


def shard_bounds(n, k):
    """k contiguous (start, stop) ranges covering range(n); the first n % k are one longer."""
    base, extra = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def digests(stream, names=("sha256",)):
    """Hex digests (hashlib names) of what is left in a binary stream, read 1 MiB at a time."""
    hashes = [hashlib.new(name, usedforsecurity=name != "md5") for name in names]
    for block in iter(lambda: stream.read(1 << 20), b""):
        for h in hashes:
            h.update(block)
    return tuple(h.hexdigest() for h in hashes)


def cache_dir():
    """Where downloaded data sets live: $DISTMLP_DATA, else the user's cache directory."""
    if os.environ.get("DISTMLP_DATA"):
        return Path(os.environ["DISTMLP_DATA"])
    import platformdirs
    return Path(platformdirs.user_cache_dir("distmlp")) / "data"
