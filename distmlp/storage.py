"""Where a run directory lives: a local path, or a URI of any filesystem pyarrow knows
(s3://bucket/prefix, gs://bucket/prefix, file:///abs/path). S3 options go in the query
(s3://bucket/runs/a?endpoint_override=127.0.0.1:9000&scheme=http) or in the AWS_* environment.

Local paths keep their durable writes (temporary file, fsync, rename: distmlp.fsutil). A URI is
treated as an object store: no rename and no append; every object is written by one call and
appears whole (an S3 PUT), and a group of objects becomes visible when its last file (a
checkpoint's manifest) is written.
"""

import atexit
import contextlib
import functools
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from distmlp import fsutil
from distmlp.errors import UserError


class StorageError(UserError):
    """A run-directory URI that cannot be used: unknown scheme, no such bucket, refused access."""


def is_remote(target):
    """True for a URI (scheme://...), False for a local path."""
    return "://" in str(target)


def location(target):
    """A Path for a local path, the URI string otherwise (join, name and the rest take both)."""
    return str(target) if is_remote(target) else Path(target)


def join(target, *names):
    """target/name/...: a Path for a local path, the URI with the names before its query otherwise."""
    if not is_remote(target):
        return Path(target).joinpath(*names)
    base, sep, query = str(target).partition("?")
    return "/".join([base.rstrip("/"), *names]) + sep + query


def name(target):
    """The last component of a path or URI (without the query)."""
    if not is_remote(target):
        return Path(target).name
    return str(target).partition("?")[0].rstrip("/").rsplit("/", 1)[-1]


@contextlib.contextmanager
def _errors(target):
    """The filesystem's errors (other than a missing file) as one-line StorageErrors naming target."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StorageError(f"{target}: {first}") from None


def split(target):
    """(pyarrow FileSystem, path in it) for a URI."""
    base, _, query = str(target).partition("?")
    scheme, _, rest = base.partition("://")
    bucket, _, key = rest.partition("/")
    key = key.strip("/")
    if scheme == "file":
        return pafs.LocalFileSystem(), "/" + key
    with _errors(target):
        fs, root = _filesystem(scheme, bucket, query)
    return fs, f"{root.rstrip('/')}/{key}" if key else root


@functools.lru_cache(maxsize=8)
def _filesystem(scheme, bucket, query):
    """One FileSystem per bucket and options: creating an S3 client takes a while."""
    return pafs.FileSystem.from_uri(f"{scheme}://{bucket}" + (f"?{query}" if query else ""))


@atexit.register
def _drop_filesystems():
    """Let go of the cached filesystems before pyarrow finalizes S3 at exit. pyarrow.fs
    registers its finalizer when imported, before this module registers this, so this runs
    first. An S3 client still alive when finalization has run is destroyed during the
    interpreter's teardown, which can abort the process ("terminate called without an active
    exception"; apache/arrow#41087 and #36346): it happened once in a CI run of `distmlp
    checkpoint inspect s3://...`."""
    _filesystem.cache_clear()


def file_type(target):
    """pyarrow FileType of a URI (NotFound when nothing is there)."""
    fs, path = split(target)
    with _errors(target):
        return fs.get_file_info(path).type


def is_file(target):
    return file_type(target) == pafs.FileType.File if is_remote(target) else Path(target).is_file()


def is_dir(target):
    return file_type(target) == pafs.FileType.Directory if is_remote(target) else Path(target).is_dir()


def read_bytes(target):
    """The bytes of a file; FileNotFoundError if there is none."""
    if not is_remote(target):
        return Path(target).read_bytes()
    if file_type(target) != pafs.FileType.File:
        raise FileNotFoundError(f"{target}: no such file")
    fs, path = split(target)
    with _errors(target), fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(target, data, prefix=".tmp-"):
    """Replace a file with data in one step: a synced rename locally (the temporary file named
    prefix...), one PUT on an object store."""
    if not is_remote(target):
        fsutil.atomic_write(target, lambda tmp: fsutil.write_synced(tmp, data), prefix=prefix)
        return
    fs, path = split(target)
    with _errors(target):
        if isinstance(fs, pafs.LocalFileSystem):  # file://: directories are real there
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(data)


def make_dirs(target):
    """Create a local directory and its parents (an object store needs none)."""
    if not is_remote(target):
        os.makedirs(target, exist_ok=True)


def listing(target, recursive=False):
    """[(path relative to target, FileInfo)] of what a directory holds, [] when there is none;
    StorageError when its bucket does not exist."""
    fs, path = split(target) if is_remote(target) else (pafs.LocalFileSystem(), os.path.abspath(target))
    with _errors(target):
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
        bucket = path.split("/", 1)[0]
        missing = not found and fs.get_file_info(bucket).type == pafs.FileType.NotFound
        if missing and not isinstance(fs, pafs.LocalFileSystem):
            raise StorageError(f"{target}: no such bucket {bucket!r}")
    return [(entry.path[len(path.rstrip("/")) + 1:], entry) for entry in found]


def remove_file(target):
    """Delete a file of an object store (missing: nothing to do)."""
    fs, path = split(target)
    with _errors(target):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def remove_tree(target):
    """Delete a directory of an object store and everything in it (missing: nothing to do)."""
    fs, path = split(target)
    with _errors(target):
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            fs.delete_dir(path)
