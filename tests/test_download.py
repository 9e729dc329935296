"""`distmlp data download`: against HTTP mirrors on 127.0.0.1 that serve good, garbage and cut-off bodies."""

import gzip
import hashlib
import http.server
import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from distmlp import data
from distmlp.data import download
from distmlp.cli import app


def idx_gz(magic, dims, payload):
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return gzip.compress(head + payload, mtime=0)


def make_files():
    """Four small valid MNIST-named files (train 30 rows, test 20 rows) and their Remote entries."""
    rng = np.random.default_rng(0)
    contents = {
        "train-images-idx3-ubyte.gz": idx_gz(2051, [30, 28, 28], rng.integers(0, 256, 30 * 784, np.uint8).tobytes()),
        "train-labels-idx1-ubyte.gz": idx_gz(2049, [30], bytes(i % 10 for i in range(30))),
        "t10k-images-idx3-ubyte.gz": idx_gz(2051, [20, 28, 28], rng.integers(0, 256, 20 * 784, np.uint8).tobytes()),
        "t10k-labels-idx1-ubyte.gz": idx_gz(2049, [20], bytes(9 - i % 10 for i in range(20))),
    }
    remotes = tuple(download.Remote(name, hashlib.md5(body).hexdigest(), len(body), hashlib.sha256(body).hexdigest())
                    for name, body in contents.items())
    return contents, remotes


CONTENTS, FILES = make_files()


class Mirrors(http.server.BaseHTTPRequestHandler):
    """/good/NAME serves the file, /garbage/NAME same-size noise, /drop/NAME half the body then hangs up,
    /short/NAME a body without Content-Length that ends early, /long/NAME one that runs on, /hop/NAME
    redirects to /good/NAME, /downgrade/NAME to plain http on another host, anything else 404."""

    requests = []

    def do_GET(self):
        kind, _, name = self.path.strip("/").partition("/")
        self.requests.append((kind, name))
        body = CONTENTS.get(name)
        if kind in ("hop", "downgrade"):
            self.send_response(302)
            host = self.headers["Host"] if kind == "hop" else "192.0.2.1"  # TEST-NET-1: never reached
            self.send_header("Location", f"http://{host}/good/{name}")
            self.end_headers()
            return
        if body is None or kind not in ("good", "garbage", "drop", "short", "long"):
            self.send_error(404)
            return
        if kind == "garbage":
            body = bytes(reversed(body))
        if kind == "long":
            body += bytes(1 << 20)
        self.send_response(200)
        if kind not in ("short", "long"):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind in ("drop", "short"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mirrors)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    Mirrors.requests.clear()


def leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def test_good_mirror_then_dataset_resolves_to_the_cache(server, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTMLP_DATA", str(tmp_path))
    paths = download.download("mnist", files=FILES, mirror_urls=[f"{server}/good/"])
    assert [p.parent for p in paths] == [tmp_path / "mnist"] * 4
    for p in paths:
        assert p.read_bytes() == CONTENTS[p.name]
    source = data.resolve("mnist")
    assert (source.name, source.train.count, source.test.count) == ("mnist", 30, 20)
    assert data.load_rows(source.test)[1].tolist() == [9 - i % 10 for i in range(20)]
    assert leftovers(tmp_path / "mnist") == []


def test_garbage_and_dropping_mirrors_are_skipped(server, tmp_path):
    lines = []
    mirrors = [f"{server}/garbage/", f"{server}/drop/", f"{server}/short", f"{server}/good/"]  # "short": no trailing /
    download.download("mnist", tmp_path, files=FILES, mirror_urls=mirrors, log=lines.append)
    assert [kind for kind, _ in Mirrors.requests] == ["garbage", "drop", "short", "good"] * 4
    assert all((tmp_path / name).read_bytes() == body for name, body in CONTENTS.items())
    assert leftovers(tmp_path) == []
    garbage, drop, short, good = lines[:4]
    assert "/garbage/train-images-idx3-ubyte.gz: md5 " in garbage and "does not match the published" in garbage
    half, size = len(CONTENTS["train-images-idx3-ubyte.gz"]) // 2, len(CONTENTS["train-images-idx3-ubyte.gz"])
    assert f"/drop/train-images-idx3-ubyte.gz: body ended after {half} of {size} bytes" in drop
    assert f"/short/train-images-idx3-ubyte.gz: body ended after {half} of {size} bytes" in short
    assert good.endswith(f"downloaded from {server}/good/train-images-idx3-ubyte.gz, sha256 and md5 verified")


def test_no_good_mirror_leaves_nothing_and_says_why(server, tmp_path):
    mirrors = [f"{server}/garbage/", f"{server}/drop/", f"{server}/long/", f"{server}/missing/"]
    with pytest.raises(download.DownloadError) as e:
        download.download("mnist", tmp_path, files=FILES, mirror_urls=mirrors)
    message = str(e.value)
    assert message.startswith(f"{tmp_path}/train-images-idx3-ubyte.gz: no mirror delivered a file matching md5 ")
    assert "/garbage/" in message and "/drop/" in message and "HTTP Error 404" in message
    assert "/long/train-images-idx3-ubyte.gz: body is longer than the expected" in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_present_files_are_verified_and_kept_or_replaced(server, tmp_path):
    download.download("mnist", tmp_path, files=FILES, mirror_urls=[f"{server}/good/"])
    Mirrors.requests.clear()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"corrupt")
    lines = []
    download.download("mnist", tmp_path, files=FILES, mirror_urls=[f"{server}/good/"], log=lines.append)
    assert Mirrors.requests == [("good", "t10k-labels-idx1-ubyte.gz")]
    assert sum("already present, sha256 and md5 verified" in line for line in lines) == 3
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes() == CONTENTS["t10k-labels-idx1-ubyte.gz"]


def test_an_interrupted_download_leaves_nothing(server, tmp_path):
    seen = []

    class Interrupt(BaseException):
        pass

    def bar_advance(n):
        seen.append(n)
        raise Interrupt

    with pytest.raises(Interrupt):
        download._fetch(f"{server}/good/{FILES[0].name}", tmp_path / FILES[0].name, FILES[0], bar_advance)
    assert seen and list(tmp_path.iterdir()) == []


def test_mirrors_come_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv(download.MIRRORS_ENV, f"{server}/garbage/, {server}/good/")
    assert download.mirrors() == (f"{server}/garbage/", f"{server}/good/")
    download.download("mnist", tmp_path, files=FILES)
    assert [kind for kind, _ in Mirrors.requests] == ["garbage", "good"] * 4
    monkeypatch.delenv(download.MIRRORS_ENV)
    assert download.mirrors() == download.MIRRORS


def test_official_list_is_the_published_one():
    assert [(f.name, f.md5, f.size) for f in download.MNIST_FILES] == [
        ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 9912422),
        ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 28881),
        ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 1648877),
        ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 4542),
    ]
    # the sha256s TensorFlow Datasets and others publish for the same files
    assert [f.sha256 for f in download.MNIST_FILES] == [
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    ]
    assert all(m.startswith("https://") and m.endswith("/") for m in download.MIRRORS)


def test_sha256_is_checked_as_well_as_md5(server, tmp_path):
    """A file whose size and md5 match but whose sha256 does not is not accepted."""
    wrong = download.Remote(FILES[0].name, FILES[0].md5, FILES[0].size, hashlib.sha256(b"other").hexdigest())
    with pytest.raises(download.DownloadError) as e:
        download.download("mnist", tmp_path, files=[wrong], mirror_urls=[f"{server}/good/"])
    assert f"/good/{wrong.name}: sha256 {FILES[0].sha256} does not match the pinned {wrong.sha256}" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / wrong.name).write_bytes(CONTENTS[wrong.name])  # present with the right md5: fetched again
    with pytest.raises(download.DownloadError):
        download.download("mnist", tmp_path, files=[wrong], mirror_urls=[f"{server}/good/"])
    assert Mirrors.requests == [("good", wrong.name)] * 2


def test_redirects_are_followed_only_to_https_or_loopback(server, tmp_path):
    lines = []
    download.download("mnist", tmp_path, files=FILES[:1], mirror_urls=[f"{server}/downgrade/", f"{server}/hop/"],
                      log=lines.append)
    assert Mirrors.requests == [("downgrade", FILES[0].name), ("hop", FILES[0].name), ("good", FILES[0].name)]
    assert lines[0] == (f"{server}/downgrade/{FILES[0].name}: redirects to http://192.0.2.1/good/{FILES[0].name}: "
                        "not an https URL (plain http is allowed only to 127.0.0.1 or localhost); "
                        "trying the next mirror")
    assert (tmp_path / FILES[0].name).read_bytes() == CONTENTS[FILES[0].name]


runner = CliRunner()


def test_cli_download(server, tmp_path, monkeypatch):
    monkeypatch.setitem(download.DATASETS, "mnist", FILES)
    monkeypatch.setenv(download.MIRRORS_ENV, f"{server}/drop/ {server}/good/")
    result = runner.invoke(app, ["data", "download", "mnist", "--dir", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert f"mnist: 4 files in {tmp_path / 'm'}; use it with --data {tmp_path / 'm'}" in result.stdout
    assert "trying the next mirror" in result.stderr
    result = runner.invoke(app, ["data", "info", "--data", str(tmp_path / "m"), "--json"])
    assert result.exit_code == 0 and '"count": 30' in result.stdout


@pytest.mark.parametrize("args,env,message", [
    (["fashion"], None, "error: unknown data set 'fashion' to download; known: mnist"),
    (["mnist"], "/missing/", "no mirror delivered a file matching md5"),
])
def test_cli_download_errors(server, tmp_path, monkeypatch, args, env, message):
    monkeypatch.setitem(download.DATASETS, "mnist", FILES)
    monkeypatch.setenv(download.MIRRORS_ENV, f"{server}{env or '/good/'}")
    result = runner.invoke(app, ["data", "download", *args, "--dir", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert message in result.stderr
    assert result.stderr.count("error: ") == 1


@pytest.mark.parametrize("mirror", ["http://192.0.2.1/mnist/", "ftp://127.0.0.1/mnist/", "file:///etc/"])
def test_cli_refuses_a_mirror_that_is_not_https_before_fetching(tmp_path, monkeypatch, mirror):
    monkeypatch.setenv(download.MIRRORS_ENV, f"https://example.invalid/mnist/ {mirror}")
    result = runner.invoke(app, ["data", "download", "mnist", "--dir", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert result.stderr == (f"error: mirror {mirror}: not an https URL (plain http is allowed only to 127.0.0.1 "
                             f"or localhost); check {download.MIRRORS_ENV}\n")
    assert not (tmp_path / "m").exists()
