"""Data files that declare, or would decode to, far more than they hold are refused before any payload
is read. Each read runs in a child process limited to 1 GiB of address space, so a file that is not
refused crashes the child (and fails the test) instead of pytest or the machine."""

import json
import os
import subprocess
import sys
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distmlp import data
from distmlp.data import parquet as shards
from distmlp.data.source import MAX_FILE_BYTES

LIMIT = 1 << 30  # bytes of address space for the child: the interpreter with numpy and pyarrow takes ~350 MB
CHILD = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from distmlp import data
path = sys.argv[1]
try:
    {call}
except data.DataError as e:
    sys.exit(f"refused: {{e}}")
print("read")
"""


def read_in_child(call, path):
    """Run `call` (Python text using `path`) in a memory-limited child: (exit code, stdout + stderr)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD.format(limit=LIMIT, call=call), str(path)],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def gzip_of_zeros(head, zeros):
    """One gzip member: head, then `zeros` zero bytes, with a true size trailer; ~1 KB per MiB.

    Built from one compressed MiB repeated: after a full flush, deflate compresses the same
    input to the same bytes. The CRC is left 0: it is checked only at the end of the stream.
    """
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    rest = c.compress(bytes(zeros % (1 << 20))) + c.flush()
    size = (len(head) + zeros) % (1 << 32)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + first + block * (zeros >> 20) + rest
            + bytes(4) + size.to_bytes(4, "little"))


def images_head(n):
    return b"".join(v.to_bytes(4, "big") for v in (data.IMAGES_MAGIC, n, 28, 28))


def test_the_bomb_builder_makes_what_it_says(tmp_path):
    """The test files are valid gzip: the header, then the zeros, and the trailer says how many bytes."""
    raw = gzip_of_zeros(images_head(7), (64 << 20) + 5)
    assert raw[:3] == b"\x1f\x8b\x08"  # gzip, deflate; the 10-byte header has no optional fields
    stream = zlib.decompressobj(-15)
    out = stream.decompress(raw[10:], 1 << 20)
    assert out[:16] == images_head(7) and not any(out[16:])
    n = len(out)
    while not stream.eof:
        n += len(stream.decompress(stream.unconsumed_tail, 1 << 24))
    assert n == 16 + (64 << 20) + 5 and len(stream.unconsumed_tail) == 8  # then CRC and size
    assert int.from_bytes(raw[-4:], "little") == n


def test_gzip_declaring_more_than_the_limit_is_refused_unread(tmp_path):
    """5 MB of .gz whose header declares 5 GiB of images, and which does inflate to them."""
    n = (5 << 30) // 784
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_of_zeros(images_head(n), n * 784))
    assert n * 784 > MAX_FILE_BYTES and n * 784 < 1032 * path.stat().st_size  # only the limit refuses it
    code, out = read_in_child("data.read_images(path)", path)
    assert (code, out) == (1, f"refused: {path}: header declares {n * 784} bytes of payload, more than the "
                              f"{MAX_FILE_BYTES} bytes distmlp reads from one file")


def test_raw_idx_larger_than_the_limit_is_refused_unread(tmp_path):
    """A (sparse) 5 GiB raw file: its size matches its header, only the limit refuses it."""
    n = (5 << 30) // 784
    path = tmp_path / "train-images-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(images_head(n))
        f.truncate(16 + n * 784)
    code, out = read_in_child("data.read_images(path)", path)
    assert (code, out) == (1, f"refused: {path}: header declares {n * 784} bytes of payload, more than the "
                              f"{MAX_FILE_BYTES} bytes distmlp reads from one file")


@pytest.mark.parametrize("extra_rows", [1, -1], ids=["inflates-past-header", "inflates-short"])
def test_gzip_whose_size_trailer_disagrees_is_refused_unread(tmp_path, extra_rows):
    """1.3 GB of images declared, and the stream really holds one row more or one row less."""
    n = (1300 << 20) // 784
    holds = (n + extra_rows) * 784
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_of_zeros(images_head(n), holds))
    code, out = read_in_child("data.read_images(path)", path)
    if extra_rows > 0:
        assert (code, out) == (1, f"refused: {path}: 784 trailing bytes after the declared payload")
    else:
        assert (code, out) == (1, f"refused: {path}: payload is short: expected {n * 784} bytes, found {holds} "
                                  "by the gzip size trailer (a single-member gzip file is expected)")


# ----------------------------------------------------------------------------- Parquet

def varint(n):
    """Thrift compact protocol: an i64 as a zigzag varint."""
    n, out = n << 1, bytearray()  # zigzag of a non-negative number
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def write_shard(directory, rows, manifest_rows):
    """A shard directory whose one train file holds `rows` rows and whose manifest says `manifest_rows`."""
    directory.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (rows, 784), np.uint8)
    table = pa.table([pa.FixedSizeBinaryArray.from_buffers(pa.binary(784), rows, [None, pa.py_buffer(pixels)]),
                      pa.array(np.zeros(rows, np.uint8))], schema=shards.schema(784))
    path = directory / "train-00000-of-00001.parquet"
    pq.write_table(table, path)
    files = [{"name": path.name, "rows": manifest_rows, "sha256": "not checked by a read"}]
    manifest = {"format": "distmlp-shards", "version": 1, "name": "hostile", "image_shape": [28, 28],
                "splits": {"train": {"rows": manifest_rows, "files": files}, "test": {"rows": 0, "files": []}}}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return path


def edit_footer(path, old, new):
    """Set the first i64 field equal to `old` in a Parquet file's footer to `new` (same encoded length,
    so the footer still parses)."""
    raw = path.read_bytes()
    footer_start = len(raw) - 8 - int.from_bytes(raw[-8:-4], "little")
    field, edit = b"\x16" + varint(old), b"\x16" + varint(new)  # 0x16: the next field id, type i64
    assert len(edit) == len(field)
    at = raw.index(field, footer_start)
    path.write_bytes(raw[:at] + edit + raw[at + len(edit):])


# read_row_group, which decodes pages, fails loudly: these files must be refused before any decoding
READ_SHARD = ("import pyarrow.parquet; pyarrow.parquet.ParquetFile.read_row_group = None; "
              "data.load_rows(data.resolve(path=path).train, 0, 10)")


def test_parquet_row_groups_holding_more_than_the_file_declares_are_refused_undecoded(tmp_path):
    """The footer says 100 rows (as the manifest does), its one row group 300."""
    path = write_shard(tmp_path / "shards", 300, manifest_rows=100)
    edit_footer(path, 300, 100)  # the file's num_rows comes before its row groups'
    code, out = read_in_child(READ_SHARD, tmp_path / "shards")
    assert (code, out) == (1, f"refused: {path}: row groups hold 300 rows, the file declares 100")


def test_parquet_column_chunk_larger_than_its_rows_is_refused_undecoded(tmp_path):
    """The footer says the pixels of 300 rows decode to 1,000,000 bytes (they take 235,200)."""
    path = write_shard(tmp_path / "shards", 300, manifest_rows=300)
    pixels_chunk, labels_chunk = (pq.ParquetFile(path).metadata.row_group(0).column(i).total_uncompressed_size
                                  for i in (0, 1))
    edit_footer(path, pixels_chunk, 1_000_000)
    code, out = read_in_child(READ_SHARD, tmp_path / "shards")
    assert (code, out) == (1, f"refused: {path}: row group 0 decodes to {1_000_000 + labels_chunk} bytes, "
                              "more than 300 rows of 784 pixels take")
