"""`distmlp data download mnist`: the four official MNIST files from public mirrors, verified, written atomically.

Each file is streamed into a temporary file next to its final name while its size and md5 are
checked against the values published for the original file (torchvision lists the same md5s);
only a complete, matching file is renamed into place, so an interrupted or corrupt download
leaves nothing under the final name. A mirror that fails in any way is reported and the next
one is tried.
"""

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from distmlp import __version__, fsutil
from distmlp.data.source import cache_dir
from distmlp.errors import UserError

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror (torchvision)
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
    "http://yann.lecun.com/exdb/mnist/",  # the original site (often refuses scripts)
)
MIRRORS_ENV = "DISTMLP_MNIST_MIRRORS"  # comma- or space-separated base URLs, tried in order
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its name on every mirror, its published md5 and size in bytes."""

    name: str
    md5: str
    size: int


MNIST_FILES = (
    Remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
    Remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
    Remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
    Remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
)
DATASETS = {"mnist": MNIST_FILES}


class DownloadError(UserError):
    """No mirror delivered a file that matches its published checksum."""


class _MirrorFailed(Exception):
    """This mirror did not deliver the right bytes; try the next one."""


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)


def mirrors():
    """The mirror base URLs: $DISTMLP_MNIST_MIRRORS if set, else the well-known public ones."""
    value = os.environ.get(MIRRORS_ENV, "").replace(",", " ").split()
    return tuple(value) or MIRRORS


def default_dir(dataset="mnist"):
    return cache_dir() / dataset


def download(dataset="mnist", directory=None, files=None, mirror_urls=None, progress=False, log=None):
    """Fetch every file of a data set into directory (default: the cache); returns their paths.

    files and mirror_urls default to the data set's published files and to mirrors(); files
    already present with the right size and md5 are kept and not fetched again.
    """
    if dataset not in DATASETS:
        raise DownloadError(f"unknown data set {dataset!r} to download; known: {', '.join(DATASETS)}")
    directory = Path(directory) if directory is not None else default_dir(dataset)
    files = DATASETS[dataset] if files is None else files
    mirror_urls = mirrors() if mirror_urls is None else tuple(mirror_urls)
    log = log or (lambda message: None)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"{directory}: cannot create the download directory: {e.strerror or e}") from None
    paths = []
    with _progress_bar() if progress else nullcontext() as bar:
        for remote in files:
            target = directory / remote.name
            if target.is_file() and _matches(target, remote):
                log(f"{target}: already present, md5 verified")
            else:
                _fetch_from_any(remote, target, mirror_urls, bar, log)
            paths.append(target)
    return paths


def _fetch_from_any(remote, target, mirror_urls, bar, log):
    failures = []
    for mirror in mirror_urls:
        url = mirror.rstrip("/") + "/" + remote.name
        task = bar.add_task(remote.name, total=remote.size) if bar else None
        try:
            _fetch(url, target, remote, lambda n: bar.advance(task, n) if bar else None)
            log(f"{target}: downloaded from {url}, md5 verified")
            return
        except (_MirrorFailed, *_NETWORK_ERRORS) as e:
            reason = str(e).strip() or type(e).__name__
            failures.append(f"{url}: {reason}")
            log(f"{url}: {reason}; trying the next mirror")
        finally:
            if bar:
                bar.remove_task(task)
    tried = "; ".join(failures) or "no mirrors given"
    raise DownloadError(f"{target}: no mirror delivered a file matching md5 {remote.md5} ({tried})")


def _fetch(url, target, remote, advance):
    """Stream url into a temporary file beside target, check size and md5, then rename it into place."""
    def write(tmp):
        with open(tmp, "wb") as out:
            md5, size = _stream(url, out, remote.size, advance)
        if size < remote.size:
            raise _MirrorFailed(f"body ended after {size} of {remote.size} bytes")
        if size > remote.size:
            raise _MirrorFailed(f"body is longer than the expected {remote.size} bytes")
        if md5 != remote.md5:
            raise _MirrorFailed(f"md5 {md5} does not match the published {remote.md5}")

    fsutil.atomic_write(target, write, prefix=f".{remote.name}.part-")


def _stream(url, out, size, advance):
    """Copy at most size + 1 bytes of url to out; (md5 hex, bytes copied)."""
    request = urllib.request.Request(url, headers={"User-Agent": f"distmlp/{__version__}"})
    md5 = hashlib.md5(usedforsecurity=False)
    got = 0
    with urllib.request.urlopen(request, timeout=30) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != size:
            raise _MirrorFailed(f"serves {declared} bytes, expected {size}")
        while got <= size:
            block = response.read(min(_BLOCK, size + 1 - got))
            if not block:
                break
            md5.update(block)
            out.write(block)
            got += len(block)
            advance(len(block))
    return md5.hexdigest(), got


def _matches(path, remote):
    if path.stat().st_size != remote.size:
        return False
    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    return md5.hexdigest() == remote.md5


def _progress_bar():
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)
