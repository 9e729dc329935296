"""Elastic training on one node: a worker that cannot be replaced is dropped and the mesh shrinks.

The lost worker's place (its placement-group bundle) is taken by another actor right after the
kill, so no replacement can start within cluster.replace_timeout_s. The run then goes on with
the one worker left and must end with the bits of a run taken by hand: 2 workers up to the step
that failed, 1 worker from there. (Across nodes: tests/test_multinode.py.)
"""

import os
import signal
import time

import pytest
import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distmlp import config, data, elastic, trainer, transport
from hooks import AtStep, alive


@ray.remote(num_cpus=1)
class Squatter:
    def ready(self):
        return True


def job_for(optimizer="minibatch", **cluster):
    job = config.load_job(None, [f'optimizer.name="{optimizer}"', "optimizer.lr=0.1", "run.seed=9", "run.steps=40",
                                 "cluster.workers=2", "cluster.cpus_per_worker=1", "cluster.min_workers=1",
                                 "cluster.replace_timeout_s=3"])
    return config.replace(job, cluster=cluster) if cluster else job


def kill_and_take_its_place(rank, squatters):
    def action(backend):
        group = backend.group
        pid = group.worker_info[rank]["pid"]
        os.kill(pid, signal.SIGKILL)
        while alive(pid):
            time.sleep(0.01)
        strategy = PlacementGroupSchedulingStrategy(group.pg, placement_group_bundle_index=rank)
        squatters.append(Squatter.options(scheduling_strategy=strategy).remote())
        ray.get(squatters[-1].ready.remote(), timeout=60)
    return action


@pytest.mark.parametrize("optimizer", ["minibatch", "gd"])
def test_an_unreplaceable_worker_is_dropped_and_the_mesh_goes_on_bit_identically(ray_session, optimizer):
    source = data.resolve("mnist-sample")
    changes, squatters = [], []
    backend = elastic.ElasticBackend(source, job_for(optimizer), changes.append)
    try:
        assert isinstance(backend.inner, transport.MeshTransport)
        got = trainer.train(job_for(optimizer), backend,
                            hooks=[AtStep(10, kill_and_take_its_place(1, squatters))(backend)])
        assert isinstance(backend.inner, transport.MeshTransport)
    finally:
        backend.close()
    shrink, *grown = changes  # the freed CPU may let the group grow back before the end (a long gd run)
    assert (shrink["step"], shrink["workers_before"], shrink["workers_after"]) == (10, 2, 1)
    assert "lost worker(s) 1" in shrink["why"]
    assert all((c["workers_before"], c["workers_after"], c["why"]) == (1, 2, "capacity returned") for c in grown)
    legs = [(2, 10), *((c["workers_before"], c["step"]) for c in grown), (changes[-1]["workers_after"], 40)]
    state = None
    for workers, until in legs:  # by hand: the same worker counts to the same steps
        leg = config.replace(job_for(optimizer, workers=workers, min_workers=None), run={"steps": until})
        by_hand = transport.start(source, leg)
        try:
            state = trainer.train(leg, by_hand, state)
        finally:
            by_hand.close()
    assert got.step == state.step == 40
    for name in state.params:
        assert got.params[name].tobytes() == state.params[name].tobytes(), name


def test_min_workers_must_lie_between_one_and_workers():
    for bad in ("cluster.min_workers=0", "cluster.min_workers=3"):
        with pytest.raises(config.ConfigError, match=r"cluster.min_workers: \d is not allowed; must be between 1 and"):
            config.load_job(None, ["cluster.workers=2", bad])
