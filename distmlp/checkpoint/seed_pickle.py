"""The seed notebook's weights_biases.pkl, both ways: export a checkpoint's weights, import them.

The seed's pickle is a dict of six keys holding nested lists of Python floats, weights[out][in].
Import reads it with the restricted loader (safe_pickle) unless the user trusts the file.
"""

import pickle

import numpy as np

from distmlp import config, mlp, optim, storage, trainer
from distmlp.checkpoint import safe_pickle
from distmlp.checkpoint.format import CheckpointError, expected_shapes, write_atomic
from distmlp.checkpoint.run_dir import save_in_run

SEED_SIZES = (784, 16, 16, 10)
SEED_KEYS = {  # the seed notebook's pickle keys -> distmlp parameter names
    "weights_input_to_hidden1": "W1", "biases_hidden1": "b1",
    "weights_hidden1_to_hidden2": "W2", "biases_hidden2": "b2",
    "weights_hidden2_to_output": "W3", "biases_output": "b3",
}


def to_seed_dict(params):
    """The seed notebook's dict: its six keys, nested lists of Python floats, weights[out][in]."""
    sizes = mlp.layer_sizes(params)
    if sizes != SEED_SIZES:
        raise CheckpointError(f"the seed pickle format holds only a {'-'.join(map(str, SEED_SIZES))} "
                              f"model (six keys); this model is {'-'.join(map(str, sizes))}")
    return {key: params[name].astype(np.float64).tolist() for key, name in SEED_KEYS.items()}


def export_seed_pickle(ckpt, path):
    """Write ckpt's weights as the seed's weights_biases.pkl (atomically)."""
    payload = pickle.dumps(to_seed_dict(ckpt.params))
    try:
        write_atomic(path, payload)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e}") from None
    return str(path)


def from_seed_dict(obj, source, dtype="float64"):
    """params from a seed-format dict, every key, shape and value checked."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected the seed's dict of six keys, got {type(obj).__name__}")
    missing = [k for k in SEED_KEYS if k not in obj]
    extra = sorted(str(k) for k in obj if k not in SEED_KEYS)
    if missing or extra:
        raise CheckpointError(f"{source}: missing keys {missing}, unexpected keys {extra}; "
                              f"the seed format has exactly {', '.join(SEED_KEYS)}")
    shapes = expected_shapes(SEED_SIZES)
    params = {}
    for key, name in SEED_KEYS.items():
        try:
            a = np.asarray(obj[key], dtype=np.float64)
        except OverflowError:
            raise CheckpointError(f"{source}: {key} holds an int past float64's range") from None
        except (ValueError, TypeError, RecursionError, MemoryError):  # the last two: --trust-pickle objects
            raise CheckpointError(f"{source}: {key} is not a rectangular list of numbers") from None
        if a.shape != shapes[name]:
            raise CheckpointError(f"{source}: {key} has shape {list(a.shape)}, expected {list(shapes[name])}")
        if not np.isfinite(a).all():
            raise CheckpointError(f"{source}: {key} has non-finite values")
        params[name] = a.astype(dtype)
    return {name: params[name] for name in mlp.param_names(3)}


def import_seed_pickle(path, run_dir, trust=False, job=None):
    """Turn a seed weights_biases.pkl into a new run directory holding a step-0 checkpoint.

    Returns the checkpoint's path; `evaluate RUN_DIR` and `train --resume RUN_DIR` take it.
    job defaults to the default job with model.dtype float64 (the seed's Python floats).
    """
    job = job or config.replace(config.JobConfig(), model={"dtype": "float64"})
    if tuple(job.model.sizes) != SEED_SIZES:
        raise CheckpointError(f"model.sizes {list(job.model.sizes)}: a seed pickle is a "
                              f"{'-'.join(map(str, SEED_SIZES))} model")
    if storage.listing(run_dir):
        raise CheckpointError(f"{run_dir}: exists and is not empty; import into a new directory")
    params = from_seed_dict(safe_pickle.load(path, trust=trust), str(path), job.model.dtype)
    state = trainer.TrainState(params, optim.init_state(params, job.optimizer.momentum))
    return save_in_run(run_dir, state, job)
