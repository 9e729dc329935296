"""Fault-injection hooks for the training loop, shared by the fault and fast-path tests."""

import os
import signal
import time
from pathlib import Path

from distmlp import trainer


def alive(pid):
    """True while pid runs (a zombie waiting for init to reap it counts as gone)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class AtStep(trainer.Hook):
    """Hook: calls action(backend) once, after the given step (1-based) completed."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def __call__(self, backend):
        self.backend = backend
        return self

    def next_stop(self, step):
        """Rounds of steps (mesh transport) end at our step, so the action runs between steps."""
        return self.step if step < self.step else None

    def on_step(self, state, record):
        if record["step"] == self.step:
            self.action(self.backend)


def kill(rank, sig=signal.SIGKILL, log=None):
    """Action: send sig to worker rank's process (SIGKILL: and wait until it is gone)."""
    def action(backend):
        pid = backend.group.worker_info[rank]["pid"]
        os.kill(pid, sig)
        if log is not None:
            log.append((pid, time.perf_counter()))
        while sig == signal.SIGKILL and alive(pid):
            time.sleep(0.01)
    return action
