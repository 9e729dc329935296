"""Checkpoints: the on-disk format (format), checkpoints in a run directory and the loop's
hook (run_dir), and the seed notebook's pickle (seed_pickle, read by safe_pickle).
"""

from distmlp.checkpoint.format import (  # noqa: F401
    ARRAY_SCHEMA, FILES, Checkpoint, CheckpointError, expected_shapes, load, save, write_atomic)
from distmlp.checkpoint.run_dir import (  # noqa: F401
    CheckpointHook, check_sampler, checkpoints_dir, clean_leftovers, describe, latest_valid,
    list_checkpoints, pointer, resolve, save_in_run, step_name, to_train_state)
from distmlp.checkpoint.seed_pickle import (  # noqa: F401
    SEED_KEYS, SEED_SIZES, export_seed_pickle, from_seed_dict, import_seed_pickle, to_seed_dict)
