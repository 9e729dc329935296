"""Run by tests in a fresh interpreter: a multi-node Ray (ray.cluster_utils.Cluster) in one process.

`python tests/multinode.py placement` trains with 2 workers on a head with no CPUs plus two
1-CPU nodes, then with 1 worker, and prints one JSON line with the node ids and weights.
"""

import json
import sys

import numpy as np
import ray
from ray.cluster_utils import Cluster

from distmlp import config, data, driver, trainer


def start_cluster(worker_nodes=2):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "node_ip_address": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(worker_nodes)]
    ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level="ERROR")
    cluster.wait_for_nodes()
    return cluster, nodes


def train(job, source):
    backend = driver.RayBackend(source, job)
    try:
        state = trainer.train(job, backend)
        return state, backend.worker_info
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
            out[workers] = {"nodes": [i["node_id"] for i in info],
                            "params": {k: v.tolist() for k, v in state.params.items()},
                            "accuracy": state.metrics["test_accuracy"]}
        print(json.dumps(out))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    {"placement": placement}[sys.argv[1]]()
