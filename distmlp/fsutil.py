"""Durable writes shared by checkpoints, metrics, shards and downloads.

A reader sees either the old file or the complete new one: write a temporary file beside the
target, fsync it, rename it onto the target, fsync the directory.
"""

import os
import stat
import tempfile
from pathlib import Path


def check_private_dir(directory):
    """Refuse a directory that is not a real directory of this user with mode 0700 (another
    user could have made it, or put a symlink there)."""
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise PermissionError(f"{directory}: not a private directory of this user (mode 0700); refusing it")


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_synced(path, data):
    """Write bytes to path and fsync them (no rename: for files inside a temporary directory)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path, write, prefix=".tmp-", mode=0o644):
    """Call write(tmp_path) on a temporary file beside path, then sync and rename it onto path.

    If write raises, the temporary file is removed and path is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
