"""Which examples each step uses: a pure function of (seed, step), so any step can be replayed.

Every draw comes from a generator seeded by (seed, stream, epoch or step), never from a
generator carried across steps. Resuming at step k therefore needs nothing but k, and the
batches do not depend on how many workers there are (the driver draws global indices).
"""

import numpy as np

_SHUFFLE_STREAM = 1
_SAMPLE_STREAM = 2


class Sampler:
    """Global example indices for each step of one optimizer over n training examples.

    gd: every example each step (batch() returns None: "the whole shard").
    minibatch: `batch_size` indices per step; sgd: one index per step.
      sequential: in data order (the seed's per-example SGD);
      shuffle: a fresh permutation each epoch, consumed in order;
      sample: an independent draw without replacement each step (the seed's random.sample).
    An epoch is n // batch_size steps (the remainder of a shuffled epoch is dropped).
    """

    def __init__(self, optimizer, n, batch_size=32, sampling="shuffle", seed=0):
        self.optimizer = optimizer
        self.n = n
        self.batch_size = {"gd": n, "sgd": 1}.get(optimizer, batch_size)
        if self.batch_size > n:
            raise ValueError(f"optimizer.batch_size: {batch_size} is larger than the {n} training examples")
        self.sampling = sampling
        self.seed = seed
        self.steps_per_epoch = 1 if optimizer == "gd" else n // self.batch_size
        self._perm_epoch, self._perm = None, None

    def epoch_of(self, step):
        return step // self.steps_per_epoch

    def batch(self, step):
        """Sorted-as-drawn int64 indices for step (0-based), or None for the full data set."""
        if self.optimizer == "gd":
            return None
        epoch, k = divmod(step, self.steps_per_epoch)
        lo, hi = k * self.batch_size, (k + 1) * self.batch_size
        if self.sampling == "sequential":
            return np.arange(lo, hi, dtype=np.int64)
        if self.sampling == "shuffle":
            return self._permutation(epoch)[lo:hi]
        rng = np.random.default_rng([self.seed, _SAMPLE_STREAM, step])
        return rng.choice(self.n, size=self.batch_size, replace=False)

    def _permutation(self, epoch):
        if self._perm_epoch != epoch:
            rng = np.random.default_rng([self.seed, _SHUFFLE_STREAM, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.n), epoch
        return self._perm

    def __getstate__(self):
        """Pickled without the cached permutation, which is rebuilt from (seed, epoch) where used."""
        return {**self.__dict__, "_perm_epoch": None, "_perm": None}

    def state(self):
        """Everything that determines future batches besides the step counter."""
        return {"kind": "counter-based", "seed": self.seed, "sampling": self.sampling,
                "batch_size": self.batch_size, "n": self.n}
