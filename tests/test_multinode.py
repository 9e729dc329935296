"""Multi-node placement with ray.cluster_utils.Cluster (in a subprocess: one Ray per process)."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(__file__)


def run_script(*args, timeout=300, script="multinode.py"):
    """The JSON line that tests/<script> prints when run with args in a fresh interpreter."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_workers_spread_over_two_nodes_and_match_one_worker():
    out = run_script("placement")
    two, one = out["2"], out["1"]
    assert len(set(two["nodes"])) == 2, "SPREAD placement put both workers on one node"
    # across nodes every worker loads only its own shard: no node gets a copy of the whole data set
    assert two["node_copies"] == 0 and two["n_train"] == [4000, 4000]
    for name in one["params"]:
        np.testing.assert_allclose(np.array(two["params"][name]), np.array(one["params"][name]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    assert abs(two["accuracy"] - one["accuracy"]) <= 1e-3


def test_losing_a_node_restarts_its_worker_on_a_new_node_bit_identical():
    """The node of worker 1 is killed after step 2 and a fresh node added: same bits as unfailed."""
    out = run_script("node_loss")
    assert out["nodes_after"][1] == out["added"] != out["removed"]
    assert out["removed"] not in out["nodes_after"]
    assert out["failures"] == 1 and out["steps"] == 5
    assert out["failed"] == out["clean"]  # hex of every weight's bytes
    print(f"node loss: recovered in {out['recovery_s']:.1f} s (node added, worker restarted, step recomputed)")
