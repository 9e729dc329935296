"""The restricted pickle loader: what weights files need loads, anything that runs code is refused."""

import logging
import os
import pickle

import numpy as np
import pytest

from distmlp.checkpoint import safe_pickle


class RunsCommand:
    """Unpickling this calls os.system(command): the classic malicious pickle."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def write(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_containers_numbers_and_numpy_round_trip(tmp_path, protocol):
    obj = {"w": [[0.25, -1.5], [3.0, 4.0]], "b": (1, 2.5, True, None), "s": {1, 2}, "f": frozenset("ab"),
           "bytes": b"\x00\xff", "c": 1 + 2j, "a64": np.arange(6.0).reshape(2, 3),
           "a32": np.ones(3, np.float32), "i": np.int64(7), "x": np.float64(1.5),
           "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3))}
    loaded = safe_pickle.load(write(tmp_path / "ok.pkl", obj, protocol))
    assert loaded.keys() == obj.keys()
    for key in ("w", "b", "s", "f", "bytes", "c", "i", "x"):
        assert loaded[key] == obj[key]
    for key in ("a64", "a32", "fortran"):
        assert loaded[key].dtype == obj[key].dtype
        np.testing.assert_array_equal(loaded[key], obj[key])


def test_numpy1_module_names_are_accepted():
    """NumPy 1 pickles name numpy.core.multiarray; NumPy 2 names numpy._core.multiarray."""
    payload = pickle.dumps(np.arange(3.0), protocol=2)
    old = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != payload
    np.testing.assert_array_equal(safe_pickle.loads(old), np.arange(3.0))


def test_command_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.pkl", {"weights": RunsCommand(f"touch {marker}")})
    with pytest.raises(safe_pickle.UnsafePickleError) as e:
        safe_pickle.load(path)
    assert "forbidden global posix.system" in str(e.value) or "forbidden global os.system" in str(e.value)
    assert str(path) in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "exec"), ("builtins", "getattr"),
                                         ("subprocess", "Popen"), ("numpy", "load"),
                                         ("numpy.testing._private.utils", "runstring"),
                                         ("numpy._core.multiarray", "fromfile")])
def test_other_dangerous_globals_are_refused(module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"q\x00."
    with pytest.raises(safe_pickle.UnsafePickleError, match=f"forbidden global {module}.{name}"):
        safe_pickle.loads(payload)


def test_eval_reduce_is_refused(tmp_path):
    with pytest.raises(safe_pickle.UnsafePickleError, match="forbidden global builtins.eval"):
        safe_pickle.load(write(tmp_path / "eval.pkl", CallsEval()))


def test_refusal_does_not_fall_back_even_when_caught(tmp_path):
    """The error is the only outcome: no second, unrestricted attempt happens behind it."""
    marker = tmp_path / "pwned"
    path = write(tmp_path / "evil.pkl", RunsCommand(f"touch {marker}"))
    for _ in range(2):
        with pytest.raises(safe_pickle.UnsafePickleError):
            safe_pickle.load(path)
    assert not marker.exists()


def test_trust_runs_the_unrestricted_loader_with_a_warning(tmp_path, caplog):
    marker = tmp_path / "ran"
    path = write(tmp_path / "trusted.pkl", RunsCommand(f"touch {marker}"))
    with caplog.at_level(logging.WARNING, logger="distmlp.checkpoint.safe_pickle"):
        assert safe_pickle.load(path, trust=True) == 0
    assert marker.exists()
    assert "unrestricted pickle loader" in caplog.text


@pytest.mark.parametrize("payload,needle", [(b"", "not a readable pickle"),
                                            (b"\x80\x04\x95garbage", "not a readable pickle"),
                                            (pickle.dumps([1.0, 2.0])[:-3], "not a readable pickle")])
def test_truncated_or_garbage_is_a_user_error(tmp_path, payload, needle):
    path = tmp_path / "bad.pkl"
    path.write_bytes(payload)
    with pytest.raises(safe_pickle.PickleFileError, match=needle) as e:
        safe_pickle.load(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(safe_pickle.PickleFileError, match="no such file"):
        safe_pickle.load(tmp_path / "nope.pkl")
