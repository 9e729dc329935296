"""Parquet shards: a data set as N files per split plus a manifest, read by row range from any filesystem.

    OUT/manifest.json                  format, version, image shape, per split: files, rows, sha256
    OUT/train-00000-of-00003.parquet   pixels fixed_size_binary[784] (one uint8 per pixel), label uint8
    OUT/test-00000-of-00003.parquet    ...

Pixels are a fixed-size binary column rather than a fixed-size list of uint8: the schema still
fixes the row length, but Parquet stores one value per row instead of 784 values with
repetition/definition levels, so reading 8,000 rows takes ~40 ms instead of ~380 ms and the file
is smaller; the column's data buffer is the (n, 784) uint8 array, read without a copy.
Pages carry CRCs, checked on read, so a flipped byte in the
rows a worker reads is caught without hashing whole files (the manifest's sha256s are checked
by `verify`). Before a page is decoded, a file's footer must agree with the manifest (rows,
pixel width, row groups, uncompressed sizes), so a small file cannot decode to a large buffer.
"""

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from distmlp import fsutil
from distmlp.data.source import MAX_FILE_BYTES, DataError, DataSource, check_labels, digests, shard_bounds

FORMAT = "distmlp-shards"
VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
ROW_GROUP = 4096  # rows per row group: 3.2 MB of pixels, the unit a reader fetches
_MAX_MANIFEST = 1 << 20
_MAX_SIDE = 1 << 12  # image side; keeps a row's pixel count a size pyarrow and numpy accept
_ROW_EXTRA = 8  # bytes a row may take beyond its pixels once uncompressed: an int32 label, a dictionary index
_PAGE_EXTRA = 1 << 16  # bytes a row group may take beyond its rows: page headers, the labels' dictionary
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)  # ArrowException covers Arrow's
# own MemoryError, TypeError, IndexError... raised for a corrupt file; plain Python ones are bugs


@contextmanager
def _reading(where):
    """Turn anything pyarrow raises about a bad file into one DataError line naming it."""
    try:
        yield
    except DataError:
        raise
    except _ARROW_ERRORS as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{where}: {first}") from None


def schema(pixels):
    return pa.schema([pa.field("pixels", pa.binary(pixels), nullable=False),
                      pa.field("label", pa.uint8(), nullable=False)])


# ------------------------------------------------------------------------------ write


def convert(source, out, n_shards, row_group=ROW_GROUP):
    """Write source's train and test splits as n_shards Parquet files each under out; returns the manifest.

    Everything is written into a temporary sibling directory that is renamed to out at the end,
    so an interrupted conversion leaves nothing under out.
    """
    out = Path(out)
    if "://" in str(out):
        raise DataError(f"{out}: convert writes a local directory; copy it to object storage afterwards")
    if out.exists():
        raise DataError(f"{out}: already exists; choose a new output directory")
    if n_shards < 1 or row_group < 1:
        raise DataError(f"--shards {n_shards} and row group {row_group} must be at least 1")
    for name in SPLITS:
        if n_shards > getattr(source, name).count:
            raise DataError(f"--shards {n_shards} is more than the {getattr(source, name).count} rows "
                            f"of split {name}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; shards are meant to be shared
        manifest = {"format": FORMAT, "version": VERSION, "name": source.name, "splits": {}}
        for name in SPLITS:
            split = getattr(source, name)
            manifest["image_shape"] = list(split.image_shape())
            manifest["splits"][name] = _write_split(tmp, name, split, n_shards, row_group)
        fsutil.write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        os.rename(tmp, out)
        fsutil.fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_split(directory, name, split, n_shards, row_group):
    files = []
    for i, (a, b) in enumerate(shard_bounds(split.count, n_shards)):
        x, y = split.read(a, b)  # (n, 784), (n,)
        file_name = f"{name}-{i:05d}-of-{n_shards:05d}.parquet"
        path = directory / file_name
        _write_shard(path, x, y, row_group)
        with open(path, "rb") as f:
            files.append({"name": file_name, "rows": b - a, "sha256": digests(f)[0]})
    return {"rows": split.count, "files": files}


def _write_shard(path, x, y, row_group):
    x = np.ascontiguousarray(x)  # (n, 784) uint8
    pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(x.shape[1]), len(x), [None, pa.py_buffer(x)])
    table = pa.Table.from_arrays([pixels, pa.array(y)], schema=schema(x.shape[1]))
    with open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=row_group, compression="zstd",
                       write_statistics=["label"], write_page_checksum=True)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------- read


def _filesystem(uri):
    """(pyarrow FileSystem, base path) for a local path or a URI (file://, s3://, gs://, ...)."""
    if "://" not in uri:
        uri = os.path.abspath(uri)
    with _reading(uri):
        return pafs.FileSystem.from_uri(uri)


def read_manifest(uri):
    """The checked manifest of a shard directory."""
    fs, base = _filesystem(uri)
    where = f"{uri.rstrip('/')}/{MANIFEST}"
    with _reading(where):
        with fs.open_input_stream(f"{base.rstrip('/')}/{MANIFEST}") as f:
            raw = f.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise DataError(f"{where}: larger than {_MAX_MANIFEST} bytes, not a shard manifest")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not valid JSON: {e}") from None
    _check_manifest(manifest, where)
    return manifest


def _is_count(v):
    return type(v) is int and v >= 0


def _check_manifest(m, where):
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{where}: not a distmlp shard manifest (format is not {FORMAT!r})")
    if m.get("version") != VERSION:
        raise DataError(f"{where}: format version {m.get('version')!r}, this distmlp reads {VERSION}")
    shape = m.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_count(d) and 0 < d <= _MAX_SIDE for d in shape)):
        raise DataError(f"{where}: image_shape {shape!r} is not [rows, cols] of 1..{_MAX_SIDE}")
    splits = m.get("splits")
    if not isinstance(splits, dict) or sorted(splits) != sorted(SPLITS):
        raise DataError(f"{where}: splits must be exactly {', '.join(SPLITS)}")
    for name, entry in splits.items():
        files = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(files, list) or not _is_count(entry.get("rows")):
            raise DataError(f"{where}: split {name} needs rows and a list of files")
        for f in files:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str) and _is_count(f.get("rows"))
                    and isinstance(f.get("sha256"), str)):
                raise DataError(f"{where}: split {name}: file entry {f!r} needs name, rows, sha256")
            if "/" in f["name"] or "\\" in f["name"] or f["name"].startswith("."):
                raise DataError(f"{where}: split {name}: file name {f['name']!r} is not a plain file name")
            if f["rows"] * (math.prod(shape) + 1) > MAX_FILE_BYTES:
                raise DataError(f"{where}: split {name}: file {f['name']} declares {f['rows']} rows of "
                                f"{math.prod(shape)} pixels, more than the {MAX_FILE_BYTES} bytes distmlp reads "
                                "from one file")
        if sum(f["rows"] for f in files) != entry["rows"]:
            raise DataError(f"{where}: split {name}: file rows add up to {sum(f['rows'] for f in files)}, "
                            f"not {entry['rows']}")


def source(uri):
    """A DataSource over a shard directory (local path or URI); reads only the manifest."""
    uri = str(uri) if "://" in str(uri) else os.path.abspath(uri)
    m = read_manifest(uri)
    train, test = (ParquetSplit(uri, name, 0, m["splits"][name]["rows"]) for name in SPLITS)
    return DataSource(m.get("name") if isinstance(m.get("name"), str) else uri, train, test)


@dataclass(frozen=True)
class ParquetSplit:
    """Rows [offset, offset + count) of one split of a shard directory."""

    kind = "parquet"  # class attribute, not a field: the format's name
    uri: str  # the shard directory: a local path or a URI (file://, s3://, gs://, ...)
    split: str  # "train" or "test"
    offset: int
    count: int

    @property
    def where(self):
        return self.uri

    def image_shape(self):
        """(rows, cols) of one image, from the manifest."""
        return tuple(read_manifest(self.uri)["image_shape"])

    def read(self, start, stop):
        """Rows [start, stop) of the split: (uint8 (n, pixels), uint8 (n,)), reading only the
        files and row groups that hold them."""
        m = read_manifest(self.uri)
        where = f"{self.uri.rstrip('/')}/{MANIFEST}"
        if self.split not in SPLITS:
            raise DataError(f"{where}: no split {self.split!r}")
        entry = m["splits"][self.split]
        pixels = math.prod(m["image_shape"])
        lo, hi = self.offset + start, self.offset + stop
        if not 0 <= lo <= hi <= entry["rows"]:
            raise DataError(f"{where}: rows [{lo}, {hi}) outside the {entry['rows']} rows of split {self.split}")
        fs, base = _filesystem(self.uri)
        xs, ys, first = [np.empty((0, pixels), np.uint8)], [np.empty(0, np.uint8)], 0
        for f in entry["files"]:
            a, b = first, first + f["rows"]
            first = b
            if a < hi and b > lo:
                x, y = _read_file(fs, f"{base.rstrip('/')}/{f['name']}", f"{self.uri.rstrip('/')}/{f['name']}",
                                  f["rows"], pixels, max(lo, a) - a, min(hi, b) - a)
                xs.append(x)
                ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    def verify(self):
        """The number of files in the whole shard directory whose sha256 matches the manifest."""
        return verify(self.uri)


def _read_file(fs, path, where, rows, pixels, lo, hi):
    """Rows [lo, hi) of one shard file, reading only the row groups that overlap them."""
    tables = []
    with _reading(where):
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle, page_checksum_verification=True)
            groups = _checked_row_groups(pf, rows, pixels, where)
            first = 0
            for i, n in enumerate(groups):
                if first < hi and first + n > lo:
                    table = pf.read_row_group(i, use_threads=False)
                    if table.num_rows != n:
                        raise DataError(f"{where}: row group {i} holds {table.num_rows} rows, declares {n}")
                    tables.append(table.slice(max(lo - first, 0), min(hi, first + n) - max(lo, first)))
                first += n
        return _to_numpy(pa.concat_tables(tables) if tables else schema(pixels).empty_table(),
                         pixels, where, lo)


def _checked_row_groups(pf, rows, pixels, where):
    """The rows of each row group, once the footer shows that the file holds `rows` rows of `pixels`
    pixels and decodes to no more than they take: checked before any page is decoded."""
    _check_schema(pf.schema_arrow, pixels, where)
    meta = pf.metadata
    if meta.num_rows != rows:
        raise DataError(f"{where}: {meta.num_rows} rows, the manifest says {rows}")
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    held = [g.num_rows for g in groups]
    if sum(held) != rows or min(held, default=0) < 0:
        raise DataError(f"{where}: row groups hold {sum(held)} rows, the file declares {rows}")
    for i, g in enumerate(groups):
        size = sum(g.column(j).total_uncompressed_size for j in range(g.num_columns))
        if size > g.num_rows * (pixels + _ROW_EXTRA) + _PAGE_EXTRA:
            raise DataError(f"{where}: row group {i} decodes to {size} bytes, more than {g.num_rows} rows "
                            f"of {pixels} pixels take")
    return held


def _check_schema(found, pixels, where):
    want = schema(pixels)
    if found.names != want.names or found.types != want.types:
        got = ", ".join(f"{f.name}: {f.type}" for f in found)
        raise DataError(f"{where}: columns ({got}), expected (pixels: fixed_size_binary[{pixels}], "
                        f"label: uint8)")


def _to_numpy(table, pixels, where, lo):
    px = table.column("pixels").combine_chunks()
    labels = table.column("label").combine_chunks()
    if px.null_count or labels.null_count:
        raise DataError(f"{where}: null values in rows [{lo}, {lo + len(px)})")
    x = np.empty((0, pixels), np.uint8)
    if len(px):
        x = np.frombuffer(px.buffers()[1], np.uint8, len(px) * pixels, px.offset * pixels).reshape(-1, pixels)
    y = labels.to_numpy(zero_copy_only=False)  # (n,)
    check_labels(y, where, lo)
    return x, y


def verify(uri):
    """Check every file's sha256 against the manifest (reads every byte); returns the file count."""
    m = read_manifest(uri)
    fs, base = _filesystem(uri)
    count = 0
    for entry in m["splits"].values():
        for f in entry["files"]:
            where = f"{uri.rstrip('/')}/{f['name']}"
            with _reading(where):
                with fs.open_input_stream(f"{base.rstrip('/')}/{f['name']}") as stream:
                    (sha256,) = digests(stream)
            if sha256 != f["sha256"]:
                raise DataError(f"{where}: sha256 {sha256} does not match the manifest's {f['sha256']}")
            count += 1
    return count
