"""Crafted pickles that attack a restricted unpickler: crashes, memory bombs, refused types.

Each variant is {name: (payload bytes, text the refusal must contain)}. Variants that go
through a global end with an os.system('touch MARKER') call, so a loader that let the
attack through and kept going would leave MARKER behind. Run as a script to write them:
python tests/evil_pickles.py DIR MARKER.
"""

import os
import pickle
import sys
from pathlib import Path

import numpy as np

MAX_BYTES = 64 * 2 ** 20  # the loader's file size limit
SEED_KEY = "weights_input_to_hidden1"


class Call:
    """Pickles as fn(*args), then BUILD with state when given: what a crafted file can hold."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


def object_dtype_without_refs():
    """dtype('O') whose BUILD state says it holds no references: NumPy reads items as raw bytes."""
    return Call(np.dtype, "O8", False, True, state=(3, "|", None, None, None, -1, -1, 0))


def nested(depth):
    """A list nested depth levels deep, built with native opcodes only (no recursion to pickle it)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def shared_tuples(levels):
    """(t, t) of (t, t) ... levels deep: a few bytes that a tree walk sees as 2**levels tuples."""
    return b"\x80\x02]q\x00" + b"0h\x00h\x00\x86q\x00" * levels + b"."


def cycle():
    """A list that holds itself."""
    loop = []
    loop.append(loop)
    return loop


def with_marker(obj, marker):
    """obj in the seed's dict, followed by a call that would touch marker."""
    return pickle.dumps([{SEED_KEY: obj}, Call(os.system, f"touch {marker}")], protocol=2)


def variants(marker):
    """{name: (payload, expected refusal text)}."""
    multiarray, numeric = np._core.multiarray, np._core.numeric
    dtype = object_dtype_without_refs()
    ndarray_state = (1, (1,), dtype, False, b"A" * 8)
    through_globals = {
        "dtype-scalar": (Call(multiarray.scalar, dtype, b"A" * 8), "forbidden global numpy._core.multiarray.scalar"),
        "dtype-reconstruct": (Call(multiarray._reconstruct, np.ndarray, (0,), b"b", state=ndarray_state),
                              "forbidden global numpy._core.multiarray._reconstruct"),
        "dtype-frombuffer": (Call(numeric._frombuffer, b"A" * 8, dtype, (1,), "C"),
                             "forbidden global numpy._core.numeric._frombuffer"),
        "ndarray-uninitialised": (Call(np.ndarray, (4096, 4096), np.dtype("f8")), "forbidden global numpy.ndarray"),
        "bytearray-bomb": (Call(bytearray, 10 ** 15), "forbidden global __builtin__.bytearray"),
        "bytes-call": (Call(bytes, 10 ** 9), "forbidden global __builtin__.bytes"),
        "set-call": (Call(set, [1.0]), "forbidden global __builtin__.set"),
        "frozenset-call": (Call(frozenset, [1.0]), "forbidden global __builtin__.frozenset"),
        "complex-call": (Call(complex, 1.0, 2.0), "forbidden global __builtin__.complex"),
        "codecs-encode": (Call(__import__("_codecs").encode, "x", "latin1"), "forbidden global _codecs.encode"),
    }
    found = {name: (with_marker(obj, marker), needle) for name, (obj, needle) in through_globals.items()}
    found |= {  # native opcodes: no global to refuse, the loaded types are checked instead
        "bytes-native": (pickle.dumps({SEED_KEY: b"A" * 8}, protocol=3), "holds a bytes"),
        "bytearray-native": (pickle.dumps({SEED_KEY: bytearray(8)}, protocol=5), "holds a bytearray"),
        "bytearray8-bomb": (b"\x80\x05\x96" + (2 ** 40).to_bytes(8, "little") + b".", "holds a bytearray"),
        "set-native": (pickle.dumps({SEED_KEY: {1.0}}, protocol=4), "holds a set"),
        "frozenset-native": (pickle.dumps({SEED_KEY: frozenset([1.0])}, protocol=4), "holds a frozenset"),
        "int-key": (pickle.dumps({1: [1.0]}, protocol=2), "holds a dict key of type int"),
        "deep-nesting": (nested(200_000), "nested too deeply"),
        "cycle": (pickle.dumps({SEED_KEY: cycle()}, protocol=2), "nested too deeply"),
        "shared-tuples-bomb": (shared_tuples(25), "more than"),
        "memo-bomb": (b"\x80\x02]r\xff\xff\xff\x7f.", "expected the seed's dict of six keys, got list"),
        "huge-file": (b"\x80\x02N" + b" " * MAX_BYTES, "larger than 64 MiB"),
    }
    return found


if __name__ == "__main__":
    out, marker = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    for name, (payload, _) in variants(marker).items():
        (out / f"{name}.pkl").write_bytes(payload)
