"""Pickle loading that never runs code unless the user explicitly trusts the file.

A pickle names the callables it needs (its "globals"); an ordinary pickle.load imports and
calls whatever it names, e.g. os.system. A weights file needs none: the seed's dict of nested
lists of floats is built from pickle's own opcodes. So the restricted loader refuses every
global before it is imported (NumPy's too: a pickled dtype's state can make NumPy read file
bytes as pointers), then accepts only dicts with str keys, lists, tuples, str, numbers and None,
nested at most MAX_DEPTH deep and MAX_OBJECTS in all. A refused load never falls back to an
unrestricted one.
"""

import io
import logging
import pickle

from distmlp.errors import UserError

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 2 ** 20  # larger files are refused unread (the seed's file is 0.1 MB)
MAX_DEPTH = 32  # containers inside containers (the seed's dict needs 3)
MAX_OBJECTS = 2 ** 20  # counted each time reached (the seed's dict holds 13 000): bounds any later walk
CONTAINERS = {dict, list, tuple}
SCALARS = {str, int, float, bool, type(None)}
ALLOWED_TEXT = ("only dicts with str keys, lists, tuples, str and numbers are allowed; "
                "pass --trust-pickle only if you trust this file")


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle refers to a global or holds a type outside the allow-list; nothing was run."""


class PickleFileError(UserError, ValueError):
    """A pickle file is missing, too large, truncated or not a pickle."""


class RestrictedUnpickler(pickle._Unpickler):
    """An Unpickler that resolves no global: only pickle's own opcodes build objects.

    The pure-Python Unpickler: its memo is a dict, where the C one allocates an array as long
    as the largest index the file names (a 9-byte file naming 2**31 asks for 16 GB).
    """

    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        raise UnsafePickleError(f"{self.source}: refused to load: forbidden global {module}.{name} "
                                f"({ALLOWED_TEXT})")

    def _refuse_bytearray(self):
        raise UnsafePickleError(f"{self.source}: refused to load: holds a bytearray ({ALLOWED_TEXT})")

    # BYTEARRAY8 allocates the length the file names before reading a byte of it
    dispatch = pickle._Unpickler.dispatch | {pickle.BYTEARRAY8[0]: _refuse_bytearray}


def check_types(obj, source):
    """Refuse obj unless it is CONTAINERS and SCALARS only, within MAX_DEPTH and MAX_OBJECTS.

    Walks every path (a list reached twice is walked twice), so a cycle fails the depth
    limit and a list of shared lists doubling at each level fails the object limit.
    """
    _check_type(obj, source)
    stack, count = [(obj, 0)], 1
    while stack:
        node, depth = stack.pop()
        if depth == MAX_DEPTH:
            raise UnsafePickleError(f"{source}: refused to load: nested too deeply (over {MAX_DEPTH} levels)")
        if type(node) is dict:
            for key in node:
                if type(key) is not str:
                    raise UnsafePickleError(f"{source}: refused to load: holds a dict key of type "
                                            f"{type(key).__name__} ({ALLOWED_TEXT})")
            node = node.values()
        count += len(node)
        if count > MAX_OBJECTS:
            raise UnsafePickleError(f"{source}: refused to load: more than {MAX_OBJECTS} objects")
        for child in node:
            if type(child) in CONTAINERS:
                stack.append((child, depth + 1))
            elif type(child) not in SCALARS:
                _check_type(child, source)
    return obj


def _check_type(obj, source):
    if type(obj) not in CONTAINERS and type(obj) not in SCALARS:
        raise UnsafePickleError(f"{source}: refused to load: holds a {type(obj).__name__} ({ALLOWED_TEXT})")


def loads(payload, source="<bytes>"):
    """Restricted load of a pickle held in memory."""
    try:
        return check_types(RestrictedUnpickler(io.BytesIO(payload), source).load(), source)
    except UnsafePickleError:
        raise
    except KeyError as e:  # the loader's opcode table
        raise PickleFileError(f"{source}: not a readable pickle: unknown opcode {e}") from None
    except Exception as e:  # whatever bad opcodes make the loader raise, MemoryError included
        raise PickleFileError(f"{source}: not a readable pickle: {_one_line(e)}") from None


def load(path, trust=False):
    """Load a pickle file of at most MAX_BYTES: restricted unless trust=True (which runs
    whatever the file says)."""
    try:
        with open(path, "rb") as f:
            payload = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise PickleFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PickleFileError(f"{path}: is a directory, expected a pickle file") from None
    except OSError as e:
        raise PickleFileError(f"{path}: cannot read: {e.strerror}") from None
    if len(payload) > MAX_BYTES:
        raise PickleFileError(f"{path}: larger than {MAX_BYTES // 2 ** 20} MiB; a weights file is far smaller")
    if not trust:
        return loads(payload, str(path))
    log.warning("%s: loading with the unrestricted pickle loader (--trust-pickle): "
                "it can run any code the file contains", path)
    try:
        return pickle.loads(payload)
    except Exception as e:
        raise PickleFileError(f"{path}: not a readable pickle: {_one_line(e)}") from None


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__
