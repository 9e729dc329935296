"""`distmlp data download mnist`: the four official MNIST files from https mirrors, verified, written atomically.

Each file is streamed into a temporary file next to its final name while its size, md5 and
sha256 are checked against the values published for the original file (torchvision lists the
same md5s; TensorFlow Datasets and others the same sha256s); only a complete, matching file is
renamed into place, so an interrupted or corrupt download leaves nothing under the final name.
A mirror that fails in any way is reported and the next one is tried. Mirrors and redirects
must be https; plain http is allowed only to this machine (127.0.0.1, localhost, ::1).
"""

import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from distmlp import __version__, fsutil
from distmlp.data.source import cache_dir, digests
from distmlp.errors import UserError

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",  # PyTorch's mirror (torchvision)
    "https://storage.googleapis.com/cvdf-datasets/mnist/",  # TensorFlow's mirror
)
MIRRORS_ENV = "DISTMLP_MNIST_MIRRORS"  # comma- or space-separated base URLs, tried in order
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the hosts a plain-http mirror may have (local test servers)
_BLOCK = 1 << 16


@dataclass(frozen=True)
class Remote:
    """One file to fetch: its name on every mirror, its published md5, size in bytes and sha256."""

    name: str
    md5: str
    size: int
    sha256: str


MNIST_FILES = (
    Remote("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422,
           "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
    Remote("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881,
           "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
    Remote("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877,
           "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
    Remote("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542,
           "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
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


def _insecure(url):
    """Why url may not be fetched, or None: it must be https, or plain http to this machine."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK):
        return None
    return "not an https URL (plain http is allowed only to 127.0.0.1 or localhost)"


class _HttpsRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only to a URL a mirror may have."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if reason := _insecure(newurl):
            raise _MirrorFailed(f"redirects to {newurl}: {reason}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpsRedirects)


def default_dir(dataset="mnist"):
    return cache_dir() / dataset


def download(dataset="mnist", directory=None, files=None, mirror_urls=None, progress=False, log=None):
    """Fetch every file of a data set into directory (default: the cache); returns their paths.

    files and mirror_urls default to the data set's published files and to mirrors(); files
    already present with the right size, md5 and sha256 are kept and not fetched again.
    """
    if dataset not in DATASETS:
        raise DownloadError(f"unknown data set {dataset!r} to download; known: {', '.join(DATASETS)}")
    directory = Path(directory) if directory is not None else default_dir(dataset)
    files = DATASETS[dataset] if files is None else files
    mirror_urls = mirrors() if mirror_urls is None else tuple(mirror_urls)
    for url in mirror_urls:
        if reason := _insecure(url):
            raise DownloadError(f"mirror {url}: {reason}; check {MIRRORS_ENV}")
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
                log(f"{target}: already present, sha256 and md5 verified")
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
            log(f"{target}: downloaded from {url}, sha256 and md5 verified")
            return
        except (_MirrorFailed, *_NETWORK_ERRORS) as e:
            reason = str(e).strip() or type(e).__name__
            failures.append(f"{url}: {reason}")
            log(f"{url}: {reason}; trying the next mirror")
        finally:
            if bar:
                bar.remove_task(task)
    tried = "; ".join(failures) or "no mirrors given"
    raise DownloadError(f"{target}: no mirror delivered a file matching md5 {remote.md5} and sha256 "
                        f"{remote.sha256} ({tried})")


def _fetch(url, target, remote, advance):
    """Stream url into a temporary file beside target, check size, md5 and sha256, then rename it into place."""
    def write(tmp):
        with open(tmp, "wb") as out:
            size = _stream(url, out, remote.size, advance)
        if size < remote.size:
            raise _MirrorFailed(f"body ended after {size} of {remote.size} bytes")
        if size > remote.size:
            raise _MirrorFailed(f"body is longer than the expected {remote.size} bytes")
        with open(tmp, "rb") as f:
            md5, sha256 = digests(f, ("md5", "sha256"))
        if md5 != remote.md5:
            raise _MirrorFailed(f"md5 {md5} does not match the published {remote.md5}")
        if sha256 != remote.sha256:
            raise _MirrorFailed(f"sha256 {sha256} does not match the pinned {remote.sha256}")

    fsutil.atomic_write(target, write, prefix=f".{remote.name}.part-")


def _stream(url, out, size, advance):
    """Copy at most size + 1 bytes of url to out; returns how many were copied."""
    request = urllib.request.Request(url, headers={"User-Agent": f"distmlp/{__version__}"})
    got = 0
    with _OPENER.open(request, timeout=30) as response:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != size:
            raise _MirrorFailed(f"serves {declared} bytes, expected {size}")
        while got <= size:
            block = response.read(min(_BLOCK, size + 1 - got))
            if not block:
                break
            out.write(block)
            got += len(block)
            advance(len(block))
    return got


def _matches(path, remote):
    if path.stat().st_size != remote.size:
        return False
    with open(path, "rb") as f:
        return digests(f, ("md5", "sha256")) == (remote.md5, remote.sha256)


def _progress_bar():
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True), transient=True)
