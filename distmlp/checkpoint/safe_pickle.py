"""Pickle loading that never runs code unless the user explicitly trusts the file.

A pickle names the callables it needs (its "globals"); an ordinary pickle.load imports and
calls whatever it names, e.g. os.system. The restricted loader resolves only the globals a
weights file needs: builtin containers and numbers, and NumPy arrays, dtypes and scalars
(pickled under numpy.core by NumPy 1 and numpy._core by NumPy 2). Anything else is refused
before it is imported, and a refused load never falls back to an unrestricted one.
"""

import io
import logging
import pickle

from distmlp.errors import UserError

log = logging.getLogger(__name__)

_BUILTINS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "complex", "bool",
             "str", "bytes", "bytearray")
_NUMPY = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),  # ndarray, protocols 0-4
    ("numpy._core.multiarray", "scalar"),  # NumPy scalars (np.float64(1.5))
    ("numpy._core.numeric", "_frombuffer"),  # ndarray, protocol 5
}
ALLOWED = {("builtins", name) for name in _BUILTINS} | _NUMPY | {
    ("_codecs", "encode"),  # how protocol 2 spells bytes
}


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A pickle refers to a global outside the allow-list; nothing of it was imported."""


class PickleFileError(UserError, ValueError):
    """A pickle file is missing, truncated or not a pickle."""


def _canonical(module):
    """One spelling per module: numpy.core.* (NumPy 1) is numpy._core.*, __builtin__ is builtins."""
    if module == "__builtin__":  # protocols 0-2 use the Python 2 name
        return "builtins"
    if module == "numpy.core" or module.startswith("numpy.core."):
        return "numpy._core" + module[len("numpy.core"):]
    return module


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose find_class resolves only ALLOWED globals."""

    def __init__(self, file, source):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        key = (_canonical(module), name)
        if key not in ALLOWED:
            raise UnsafePickleError(f"{self.source}: refused to load: forbidden global {module}.{name} "
                                    "(only containers, numbers and NumPy arrays are allowed; "
                                    "pass --trust-pickle only if you trust this file)")
        if key[0].startswith("numpy._core"):
            return _numpy_core_attr(*key)
        return super().find_class(*key)


def _numpy_core_attr(module, name):
    """The numpy._core attribute without importing the deprecated numpy.core alias."""
    import importlib
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:  # NumPy 1: only numpy.core exists
        return getattr(importlib.import_module("numpy.core" + module[len("numpy._core"):]), name)


def loads(payload, source="<bytes>"):
    """Restricted load of a pickle held in memory."""
    try:
        return RestrictedUnpickler(io.BytesIO(payload), source).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise PickleFileError(f"{source}: not a readable pickle: {e}") from None


def load(path, trust=False):
    """Load a pickle file: restricted unless trust=True (which runs whatever the file says)."""
    try:
        with open(path, "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        raise PickleFileError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PickleFileError(f"{path}: is a directory, expected a pickle file") from None
    if not trust:
        return loads(payload, str(path))
    log.warning("%s: loading with the unrestricted pickle loader (--trust-pickle): "
                "it can run any code the file contains", path)
    try:
        return pickle.loads(payload)
    except Exception as e:
        raise PickleFileError(f"{path}: not a readable pickle: {e}") from None

