"""IDX files: header parsing, size checks, row-range reads, and a split over an images/labels pair.

Images stay uint8 in memory and are scaled by 1/255 only where a batch is used
(mlp.scale_pixels): 60,000 x 784 MNIST is 47 MB as uint8 but 188 MB as float32 and
376 MB as float64, per copy, and every worker would pay that.
"""

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmlp.data.source import MAX_FILE_BYTES, DataError, DataSource, check_labels

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
UNSIGNED_BYTE = 0x08
_CHUNK = 1 << 20

# File names looked for in a data directory, per role: the seed's names, then the standard ones.
FILE_NAMES = {
    "train-images": ["train-images", "train-images-idx3-ubyte", "train-images.idx3-ubyte"],
    "train-labels": ["train-labels", "train-labels-idx1-ubyte", "train-labels.idx1-ubyte"],
    "test-images": ["test-images", "t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"],
    "test-labels": ["test-labels", "t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"],
}


# ---------------------------------------------------------------------------------- IDX

# Deflate cannot expand data more than 1032:1, so a .gz file of C bytes holds at most
# MAX_GZIP_RATIO * C bytes: a header declaring more is refused before reading anything.
MAX_GZIP_RATIO = 1032
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError
_ROLES = {IMAGES_MAGIC: ("images", 3), LABELS_MAGIC: ("labels", 1)}


def _open(path):
    path = str(path)
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected an IDX file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open: {e.strerror or e}") from None


def _read_upto(f, n, path, what):
    """Up to n bytes, read in bounded chunks so memory follows the data, not the request."""
    out = bytearray()
    try:
        while len(out) < n:
            chunk = f.read(min(_CHUNK, n - len(out)))
            if not chunk:
                break
            out += chunk
    except _READ_ERRORS as e:
        raise DataError(f"{path}: cannot read {what}: {e}") from None
    return out


def _read_exact(f, n, path, what):
    """Exactly n bytes; a short read is a DataError, never a huge allocation."""
    out = _read_upto(f, n, path, what)
    if len(out) < n:
        raise DataError(f"{path}: {what} is short: expected {n} bytes, found {len(out)}")
    return out


def _read_header(f, path, magic):
    """Parse and check the IDX header for its role; returns the declared dimensions."""
    role, ndim = _ROLES[magic]
    head = _read_upto(f, 4, path, "header")
    if not head:
        raise DataError(f"{path}: empty file, expected an IDX {role} file")
    if len(head) < 4:
        raise DataError(f"{path}: header is short: expected 4 bytes, found {len(head)}")
    if head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file (first bytes {head.hex()})")
    if head[2] != UNSIGNED_BYTE:
        raise DataError(f"{path}: element type 0x{head[2]:02x} is not unsigned byte (0x08)")
    if head[3] != ndim:
        found = int.from_bytes(head, "big")
        if found in _ROLES:
            raise DataError(f"{path}: magic {found} is an IDX {_ROLES[found][0]} file, "
                            f"expected {role} (magic {magic}); are the files swapped?")
        raise DataError(f"{path}: {head[3]} dimensions, expected {ndim} for an IDX {role} file")
    raw = _read_exact(f, 4 * ndim, path, "header")
    dims = [int.from_bytes(raw[4 * i: 4 * i + 4], "big") for i in range(ndim)]
    if ndim == 3 and (dims[1] == 0 or dims[2] == 0):
        raise DataError(f"{path}: image size {dims[1]}x{dims[2]} is empty")
    return dims


def _check_size(path, header_bytes, payload):
    """Compare the declared payload with what the file holds, in Python integers, before reading.

    A raw file must be exactly header + payload bytes. A .gz file can inflate to at most
    MAX_GZIP_RATIO times its size, and its last 4 bytes (ISIZE) state what it inflates to modulo
    2**32: exactly, for the single-member files below MAX_FILE_BYTES that distmlp reads.
    """
    size = os.path.getsize(path)
    gz = str(path).endswith(".gz")
    if gz and header_bytes + payload > MAX_GZIP_RATIO * size:
        raise DataError(f"{path}: header declares {payload} bytes of payload, more than a "
                        f"{size}-byte gzip file can hold")
    actual = size - header_bytes
    if not gz and actual < payload:
        raise DataError(f"{path}: payload is short: header declares {payload} bytes, file has {actual}")
    if header_bytes + payload > MAX_FILE_BYTES:
        raise DataError(f"{path}: header declares {payload} bytes of payload, more than the "
                        f"{MAX_FILE_BYTES} bytes distmlp reads from one file")
    if gz:
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            isize = int.from_bytes(f.read(4), "little")
        if isize > MAX_GZIP_RATIO * size:
            raise DataError(f"{path}: cannot read payload: the gzip size trailer says {isize} bytes, more than "
                            f"a {size}-byte file can hold (truncated or corrupt)")
        actual = isize - header_bytes
        if actual < payload:
            raise DataError(f"{path}: payload is short: expected {payload} bytes, found {actual} "
                            "by the gzip size trailer (a single-member gzip file is expected)")
    if actual > payload:
        raise DataError(f"{path}: {actual - payload} trailing bytes after the declared payload")


def _skip(f, n, path):
    if isinstance(f, gzip.GzipFile):
        while n:
            n -= len(_read_exact(f, min(_CHUNK, n), path, "payload"))
    elif n:
        f.seek(n, os.SEEK_CUR)


def _open_checked(f, path, magic):
    """The dimensions in an open IDX file's header, checked against the file size."""
    dims = _read_header(f, path, magic)
    _check_size(path, 4 + 4 * len(dims), math.prod(dims))
    return dims


def read_idx(path, magic, start=0, stop=None):
    """Rows [start, stop) of an IDX file of unsigned bytes, validated; (rows, row_size) uint8.

    A .gz file is checked for trailing bytes only when the range reaches its end (one byte
    past the declared payload is read, never the rest of the stream).
    """
    with _open(path) as f:
        n, *shape = _open_checked(f, path, magic)
        row = math.prod(shape)
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise DataError(f"{path}: rows [{start}, {stop}) outside the {n} rows it holds")
        _skip(f, start * row, path)
        payload = _read_exact(f, (stop - start) * row, path, "payload")
        if stop == n and _read_upto(f, 1, path, "payload"):
            raise DataError(f"{path}: trailing bytes after the declared payload")
    return np.frombuffer(payload, dtype=np.uint8).reshape(stop - start, row)


def idx_dims(path, magic):
    """The dimensions an IDX file declares, checked against its size (reads the header only)."""
    with _open(path) as f:
        return _open_checked(f, path, magic)


def idx_count(path, magic):
    """The number of items an IDX file declares (reads the header only)."""
    return idx_dims(path, magic)[0]


def read_images(path, start=0, stop=None):
    return read_idx(path, IMAGES_MAGIC, start, stop)


def read_labels(path, start=0, stop=None):
    labels = read_idx(path, LABELS_MAGIC, start, stop).reshape(-1)
    check_labels(labels, path, start)
    return labels


def find_file(directory, role):
    """The file for role ("train-images", ...) in directory, under any known name, raw or .gz."""
    directory = Path(directory)
    for name in FILE_NAMES[role]:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                return str(candidate)
    names = ", ".join(FILE_NAMES[role])
    raise DataError(f"{directory}: no {role} file (looked for {names}, raw or .gz)")


@dataclass(frozen=True)
class IdxSplit:
    """Rows [offset, offset + count) of a pair of IDX files."""

    kind = "idx"  # class attribute, not a field: the format's name
    images: str  # the images file, raw or .gz
    labels: str  # the labels file, raw or .gz
    offset: int
    count: int

    @property
    def where(self):
        return self.images

    def image_shape(self):
        """(rows, cols) of one image."""
        return tuple(idx_dims(self.images, IMAGES_MAGIC)[1:])

    def read(self, start, stop):
        """Rows [start, stop) of the split: (images uint8 (n, 784), labels uint8 (n,))."""
        lo, hi = self.offset + start, self.offset + stop
        return read_images(self.images, lo, hi), read_labels(self.labels, lo, hi)

    def verify(self):
        """None: IDX files carry no checksums beyond gzip's CRC, which every full read checks."""
        return None


def split(images, labels, offset=0, count=None):
    """An IdxSplit over rows [offset, offset + count) (default: to the end), checked against both headers."""
    n_images = idx_count(images, IMAGES_MAGIC)
    n_labels = idx_count(labels, LABELS_MAGIC)
    if n_images != n_labels:
        raise DataError(f"{images}: {n_images} images but {labels} has {n_labels} labels")
    count = n_images - offset if count is None else count
    if not (0 <= offset and 0 <= count and offset + count <= n_images):
        raise DataError(f"{images}: rows [{offset}, {offset + count}) outside the {n_images} rows it holds")
    return IdxSplit(str(images), str(labels), offset, count)


def source(directory, name):
    """A DataSource over a directory of the four IDX files (see FILE_NAMES)."""
    train = split(find_file(directory, "train-images"), find_file(directory, "train-labels"))
    test = split(find_file(directory, "test-images"), find_file(directory, "test-labels"))
    return DataSource(name, train, test)
