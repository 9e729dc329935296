"""Checkpoints in a run directory: RUN_DIR/checkpoints/step-000123/, with the text files
`latest` and `best` (held-out accuracy) naming one of them; retention, fallback to the newest
valid one, and the training-loop hook that saves them. Only the driver writes them.

The run directory may be an object-store URI (distmlp.storage): there a step-N directory
counts only once its manifest.json is written (format._put_objects), and the pointers are
single objects.
"""

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path

from distmlp import config, mlp, storage, trainer
from distmlp.checkpoint.format import (
    ASIDE_PREFIX, LEFTOVER_PREFIX, CheckpointError, load, save, write_atomic)

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints_dir(run_dir):
    return storage.join(run_dir, "checkpoints")


def step_name(step):
    return f"step-{step:06d}"


def list_checkpoints(ckpt_dir):
    """[(step, path)] of the step-N directories in ckpt_dir, oldest first, and of those moved
    aside by a replacement that crashed (step-N missing); other leftovers ignored. On an object
    store: the step-N directories that have a manifest.json."""
    if storage.is_remote(ckpt_dir):
        return sorted((int(STEP_DIR.fullmatch(step).group(1)), storage.join(ckpt_dir, step))
                      for step, finished in _step_dirs(ckpt_dir).items() if finished)
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for entry in ckpt_dir.iterdir():
        name = entry.name.removeprefix(ASIDE_PREFIX)
        match = STEP_DIR.fullmatch(name)
        if match and entry.is_dir() and (name == entry.name or not (ckpt_dir / name).exists()):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _step_dirs(ckpt_dir):
    """{"step-N": whether it has its manifest.json} in an object-store checkpoints directory."""
    steps = {}
    for rel, _ in storage.listing(ckpt_dir, recursive=True):
        step, _, rest = rel.partition("/")
        if STEP_DIR.fullmatch(step):
            steps[step] = steps.get(step, False) or rest == "manifest.json"
    return steps


def save_in_run(run_dir, state, job, sampler_state=None, epoch=0.0, keep_last=3):
    """Save RUN_DIR/checkpoints/step-N, update `latest` and `best`, prune to keep_last + best."""
    ckpt_dir = checkpoints_dir(run_dir)
    path = save(storage.join(ckpt_dir, step_name(state.step)), state, job, sampler_state, epoch)
    write_atomic(storage.join(ckpt_dir, "latest"), f"{storage.name(path)}\n".encode())
    best = _best(ckpt_dir)
    if best is not None:
        write_atomic(storage.join(ckpt_dir, "best"), f"{storage.name(best)}\n".encode())
    _prune(ckpt_dir, keep_last, best)
    clean_leftovers(ckpt_dir)
    return path


def _accuracy(path):
    """The held-out accuracy recorded in a checkpoint (unverified: used only for ranking)."""
    try:
        value = json.loads(storage.read_bytes(storage.join(path, "state.json")))["metrics"].get("test_accuracy")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _best(ckpt_dir):
    """The checkpoint with the highest held-out accuracy (the newest among ties), or None."""
    scored = [(acc, step, path) for step, path in list_checkpoints(ckpt_dir)
              if (acc := _accuracy(path)) is not None]
    return max(scored)[2] if scored else None


def _prune(ckpt_dir, keep_last, best):
    checkpoints = list_checkpoints(ckpt_dir)
    keep = {path for _, path in checkpoints[-keep_last:]} | {best}
    for _, path in checkpoints:
        if path not in keep:
            _remove(path)


def _remove(path):
    """Delete a checkpoint directory; on an object store its manifest first, so that no reader
    sees a manifest whose files are gone."""
    if storage.is_remote(path):
        storage.remove_file(storage.join(path, "manifest.json"))
        storage.remove_tree(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_leftovers(ckpt_dir):
    """Remove what a crashed save left behind; a checkpoint it had moved aside is restored.
    On an object store: the step-N directories without a manifest.json."""
    if storage.is_remote(ckpt_dir):
        for step, finished in _step_dirs(ckpt_dir).items():
            if not finished:
                storage.remove_tree(storage.join(ckpt_dir, step))
        return
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for entry in list(ckpt_dir.iterdir()):
        original = ckpt_dir / entry.name.removeprefix(ASIDE_PREFIX)
        if entry.name.startswith(ASIDE_PREFIX) and not original.exists():
            os.rename(entry, original)
        elif entry.name.startswith((ASIDE_PREFIX, LEFTOVER_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def pointer(run_dir, which="latest"):
    """The checkpoint path named by RUN_DIR/checkpoints/latest (or best), or None."""
    ckpt_dir = checkpoints_dir(run_dir)
    try:
        name = storage.read_bytes(storage.join(ckpt_dir, which)).decode(errors="replace").strip()
    except FileNotFoundError:
        return None
    return str(storage.join(ckpt_dir, name)) if STEP_DIR.fullmatch(name) else None


def latest_valid(run_dir):
    """(path, Checkpoint) of the newest checkpoint that verifies, warning for each one skipped."""
    checkpoints = list_checkpoints(checkpoints_dir(run_dir))
    if not checkpoints:
        raise CheckpointError(f"{run_dir}: no checkpoints (looked in {checkpoints_dir(run_dir)})")
    failures = []
    for _, path in reversed(checkpoints):
        try:
            ckpt = load(path)
        except CheckpointError as e:
            failures.append(str(e))
            continue
        for failure in failures:
            log.warning("%s; falling back to the previous good checkpoint %s", failure, path)
        return str(path), ckpt
    raise CheckpointError(f"{run_dir}: no valid checkpoint; newest failure: {failures[0]}")


def resolve(path):
    """(path, Checkpoint) for a checkpoint directory, or a run directory (its newest valid)."""
    path = storage.location(path)
    if storage.is_file(storage.join(path, "manifest.json")):
        return str(path), load(path)
    if storage.is_dir(checkpoints_dir(path)):
        return latest_valid(path)
    raise CheckpointError(f"{path}: neither a checkpoint directory (no manifest.json) "
                          "nor a run directory (no checkpoints/)")


class CheckpointHook(trainer.Hook):
    """Saves into RUN_DIR/checkpoints every `every` steps (0: only at the end) and at the end."""

    def __init__(self, run_dir, job, every=None, keep_last=None):
        self.run_dir = storage.location(run_dir)
        self.job = job
        self.every = job.run.checkpoint_every if every is None else every
        self.keep_last = job.run.keep_last if keep_last is None else keep_last
        self.last_path = None  # the newest checkpoint saved
        self._sampler_state, self._steps_per_epoch, self._saved_step = None, 1, None

    def on_start(self, state, info):
        self._sampler_state = trainer.make_sampler(self.job, info["n_train"]).state()
        self._steps_per_epoch = info["steps_per_epoch"]
        clean_leftovers(checkpoints_dir(self.run_dir))

    def next_stop(self, step):
        """The next step to save at: the training loop has the weights there (mesh rounds end)."""
        return (step // self.every + 1) * self.every if self.every > 0 else None

    def on_steps(self, state, steps):
        # a round ends at the step to save at (next_stop), so state holds that step's weights
        if self.every > 0 and state.step % self.every == 0:
            self._save(state)

    def on_end(self, state, record):
        if self._saved_step != state.step:
            self._save(state)

    def _save(self, state):
        epoch = state.step / self._steps_per_epoch
        self.last_path = save_in_run(self.run_dir, state, self.job, self._sampler_state, epoch, self.keep_last)
        self._saved_step = state.step


def to_train_state(ckpt):
    """A TrainState to continue training from (arrays copied)."""
    return trainer.TrainState(
        params={n: a.copy() for n, a in ckpt.params.items()},
        opt_state={n: a.copy() for n, a in ckpt.opt_state.items()},
        step=ckpt.step, samples_seen=ckpt.samples_seen,
        nonfinite_streak=ckpt.nonfinite_streak, metrics=dict(ckpt.metrics))


def check_sampler(ckpt, sampler):
    """Refuse to resume when the job would draw different batches than the checkpointed run."""
    if ckpt.sampler is not None and ckpt.sampler != sampler.state():
        raise CheckpointError(f"{ckpt.path}: sampler state {ckpt.sampler} does not match this job's "
                              f"{sampler.state()} (different data, optimizer, batch size or seed)")


def describe(path):
    """What `checkpoint inspect` shows: verified or not (and why), step, layers, metrics, config."""
    try:
        path, ckpt = resolve(path)
    except CheckpointError as e:
        return {"path": str(path), "verified": False, "error": str(e)}
    return {"path": path, "verified": True, "error": None, "step": ckpt.step, "epoch": ckpt.epoch,
            "samples_seen": ckpt.samples_seen, "sizes": list(mlp.layer_sizes(ckpt.params)),
            "dtype": ckpt.job.model.dtype, "optimizer_state": sorted(ckpt.opt_state),
            "metrics": ckpt.metrics, "config": config.to_dict(ckpt.job)}
