"""Run by tests in a fresh interpreter: a multi-node Ray (ray.cluster_utils.Cluster) in one process.

`python tests/multinode.py placement` trains with 2 workers on a head with no CPUs plus two
1-CPU nodes, then with 1 worker, and prints one JSON line with the node ids and weights.
`python tests/multinode.py node_loss` trains twice on that cluster, the second time removing the
node of worker 1 after step 2 and adding a fresh node; it prints both runs' weights and timings.
`python tests/multinode.py elastic` (three 1-CPU nodes) removes the node of worker 2 for good
after step 20, adds a node back after step 150, and prints the elastic run's weights next to
runs resumed by hand with the worker counts the elastic run moved through.
`python tests/multinode.py below_min` removes a node when cluster.min_workers is the worker count.
"""

import json
import sys
import time

import ray
from ray.cluster_utils import Cluster

from distmlp import config, data, driver, elastic, trainer, transport
from hooks import AtStep


# The GCS declares a node dead after this many failed health checks this far apart (Ray's
# defaults, 5 x 3 s, make every node-loss test wait 15 s or more for it); a killed raylet
# refuses the check at once, a live one on a busy machine still has health_check_timeout_ms (10 s).
FAST_NODE_DEATH = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                   "health_check_failure_threshold": 3}


def start_cluster(worker_nodes=2, cpus=1):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1",
                                                            "_system_config": FAST_NODE_DEATH})
    nodes = [cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1") for _ in range(worker_nodes)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    return cluster, nodes


def train(job, source, hooks=()):
    backend = transport.start(source, job)
    try:
        state = trainer.train(job, backend, hooks=[h(backend) for h in hooks])
        return state, [dict(info, node_copies=len(backend.group.node_data)) for info in backend.group.worker_info]
    finally:
        backend.close()


def placement():
    cluster, _ = start_cluster()
    try:
        source = data.resolve("mnist-sample")
        out = {}
        for workers in (2, 1):
            job = config.load_job(None, ["optimizer.name='gd'", f"cluster.workers={workers}", "run.steps=3"])
            state, info = train(job, source)
            out[workers] = {"nodes": [i["node_id"] for i in info], "node_copies": info[0]["node_copies"],
                            "n_train": [i["n_train"] for i in info],
                            "params": {k: v.tolist() for k, v in state.params.items()},
                            "accuracy": state.metrics["test_accuracy"]}
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


def replace_node(cluster, rank, events):
    """Action: kill the node hosting worker rank (no grace) and add a fresh 1-CPU node."""
    def action(backend):
        node_id = backend.group.worker_info[rank]["node_id"]
        node = next(n for n in cluster.list_all_nodes() if n.node_id == node_id)
        events["removed"], events["t_removed"] = node_id, time.perf_counter()
        cluster.remove_node(node, allow_graceful=False)
        events["added"] = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1").node_id
    return action


def note_recovery(events):
    """Action: time since the node was removed, and the failures the driver counted."""
    def action(backend):
        events["recovery_s"] = time.perf_counter() - events.pop("t_removed")
        events["failures"] = backend.group.failures
    return action


def node_loss():
    cluster, _ = start_cluster()
    try:
        source = data.resolve("mnist-sample")
        job = config.load_job(None, ["optimizer.name='gd'", "cluster.workers=2", "run.steps=5",
                                     "cluster.step_timeout_s=30", "cluster.replace_timeout_s=120"])
        clean, clean_info = train(job, source)
        events = {}
        failed, failed_info = train(job, source, [AtStep(2, replace_node(cluster, 1, events)),
                                                  AtStep(3, note_recovery(events))])
        print(json.dumps({"clean": {k: v.tobytes().hex() for k, v in clean.params.items()},
                          "failed": {k: v.tobytes().hex() for k, v in failed.params.items()},
                          "nodes_before": [i["node_id"] for i in clean_info],
                          "nodes_after": [i["node_id"] for i in failed_info],
                          "steps": failed.step, **events}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def hex_params(state):
    return {k: v.tobytes().hex() for k, v in state.params.items()}


def remove_node(cluster, rank, events):
    """Action: kill the node hosting worker rank (no grace); no node takes its place."""
    def action(backend):
        node_id = backend.group.worker_info[rank]["node_id"]
        cluster.remove_node(next(n for n in cluster.list_all_nodes() if n.node_id == node_id), allow_graceful=False)
        events["t_removed"] = time.perf_counter()
    return action


class Timed(trainer.Hook):
    """Hook: the wall time each step completed at."""

    def __init__(self):
        self.at = {}

    def on_step(self, state, record):
        self.at[record["step"]] = time.perf_counter()


def elastic_run(kind="auto"):
    cluster, _ = start_cluster(worker_nodes=3)
    try:
        source = data.resolve("mnist-sample")
        job = config.load_job(None, ["optimizer.lr=0.1", "run.seed=4", "run.steps=400", "cluster.workers=3",
                                     "cluster.min_workers=2", "cluster.replace_timeout_s=2",
                                     "cluster.step_timeout_s=30", f'cluster.transport="{kind}"'])
        events, changes, timed = {}, [], Timed()

        def add_node(backend):
            events["added"] = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1").node_id
            deadline = time.monotonic() + 30  # until the driver sees the new CPU: the next check finds it
            while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
        # look for room at every round boundary: the 250 steps after the node returns may all be
        # one round, and a check made just before it would otherwise wait GROW_CHECK_S for the next
        elastic.GROW_CHECK_S = 0.0
        backend = elastic.ElasticBackend(source, job, changes.append)
        try:
            got = trainer.train(job, backend, hooks=[timed, AtStep(20, remove_node(cluster, 2, events))(backend),
                                                      AtStep(150, add_node)(backend)])
        finally:
            backend.close()
        shrink, grow = changes
        recovered_s = timed.at[shrink["step"] + 1] - events["t_removed"]
        # by hand: 3 workers to the shrink, 2 to the growth, 3 to the end
        state = None
        for workers, until in ((3, shrink["step"]), (2, grow["step"]), (3, 400)):
            leg = config.replace(job, run={"steps": until}, cluster={"workers": workers, "min_workers": None})
            backend = transport.start(source, leg)
            try:
                state = trainer.train(leg, backend, state)
            finally:
                backend.close()
        print(json.dumps({"elastic": hex_params(got), "by_hand": hex_params(state), "changes": changes,
                          "steps": got.step, "recovered_s": recovered_s}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def below_min():
    cluster, _ = start_cluster(worker_nodes=2)
    try:
        import tempfile
        run_dir = tempfile.mkdtemp()
        job = config.load_job(None, ["optimizer.lr=0.1", "run.steps=60", "run.checkpoint_every=5",
                                     "cluster.workers=2", "cluster.min_workers=2", "cluster.replace_timeout_s=3",
                                     f"run.run_dir={json.dumps(run_dir + '/run')}"])
        events = {}
        real_train = trainer.train

        def train_with_loss(job, backend, state, hooks):
            return real_train(job, backend, state, [*hooks, AtStep(12, remove_node(cluster, 1, events))(backend)])
        trainer.train = train_with_loss
        try:
            driver.run_job(job, echo=lambda line: None)
            print(json.dumps({"error": None}))
        except driver.RunStopped as e:
            print(json.dumps({"error": str(e), "kind": type(e).__name__}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    {"placement": placement, "node_loss": node_loss, "elastic": elastic_run, "below_min": below_min}[sys.argv[1]](
        *sys.argv[2:])
