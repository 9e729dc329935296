"""The restricted pickle loader: what weights files need loads, anything that runs code is refused."""

import concurrent.futures
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import evil_pickles
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


@pytest.mark.parametrize("protocol", range(6))
def test_containers_and_numbers_round_trip(tmp_path, protocol):
    obj = {"w": [[0.25, -1.5], [3.0, 4.0]], "b": (1, 2.5, True, None), "s": "text", "n": {"k": [-2, 10 ** 30]},
           "shared rows": [[0.0] * 3] * 4}
    assert safe_pickle.load(write(tmp_path / "ok.pkl", obj, protocol)) == obj


@pytest.mark.parametrize("module", ["numpy._core.multiarray", "numpy.core.multiarray"])
def test_numpy_arrays_are_refused_under_either_module_name(module):
    """NumPy 1 pickles name numpy.core.multiarray, NumPy 2 numpy._core.multiarray: both refused."""
    payload = pickle.dumps(np.arange(3.0), protocol=2).replace(b"numpy._core.multiarray", module.encode())
    with pytest.raises(safe_pickle.UnsafePickleError, match=f"forbidden global {module}._reconstruct"):
        safe_pickle.loads(payload)


def test_trust_loads_numpy_arrays(tmp_path):
    path = write(tmp_path / "np.pkl", {"a": np.arange(6.0).reshape(2, 3)})
    np.testing.assert_array_equal(safe_pickle.load(path, trust=True)["a"], np.arange(6.0).reshape(2, 3))


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


@pytest.fixture(scope="module")
def evil_imports(tmp_path_factory):
    """{variant: (CompletedProcess, its directory)} of `distmlp checkpoint import evil.pkl -o out`
    for every crafted pickle, each in its own process (a crash fails its test, not pytest)."""
    root = tmp_path_factory.mktemp("evil")

    def run(name, payload):
        (root / name).mkdir()
        (root / name / "evil.pkl").write_bytes(payload)
        proc = subprocess.run([str(Path(sys.executable).with_name("distmlp")), "checkpoint", "import",
                               "evil.pkl", "-o", "out"], cwd=root / name, capture_output=True, text=True,
                              timeout=300)
        return name, (proc, root / name)

    payloads = {name: payload for name, (payload, _) in evil_pickles.variants("MARKER").items()}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(pool.map(lambda item: run(*item), payloads.items()))


@pytest.mark.slow
@pytest.mark.parametrize("variant,needle", [(name, needle) for name, (_, needle)
                                            in evil_pickles.variants("MARKER").items()])
def test_crafted_pickles_are_refused_in_one_line_and_nothing_runs(evil_imports, variant, needle):
    proc, cwd = evil_imports[variant]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: evil.pkl: "), proc.stderr
    assert needle in proc.stderr
    assert sorted(p.name for p in cwd.iterdir()) == ["evil.pkl"]  # no MARKER, no out/
