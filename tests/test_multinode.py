"""Multi-node placement with ray.cluster_utils.Cluster (in a subprocess: one Ray per process)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)


def run_script(*args, timeout=300, script="multinode.py", env=None):
    """The JSON line that tests/<script> prints when run with args in a fresh interpreter."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the last JSON line: Ray may print a removed node's raylet log to stdout after it
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))


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


@pytest.mark.parametrize("kind", ["actors", "auto"])
def test_a_node_lost_for_good_shrinks_the_group_and_a_node_added_grows_it_bit_identically(kind):
    """3 workers on 3 nodes; worker 2's node removed after step 20 and never replaced: the failed
    step is computed again by 2 workers; a node added after step 150: back to 3. The weights equal
    a run taken by hand through the same worker counts at the same steps (3, then 2, then 3).
    Over actor calls, and over the transport auto picks across nodes (the collective with torch)."""
    out = run_script("elastic", kind, timeout=600)
    shrink, grow = out["changes"]
    assert (shrink["workers_before"], shrink["workers_after"], shrink["step"]) == (3, 2, 20)
    assert (grow["workers_before"], grow["workers_after"]) == (2, 3) and 150 <= grow["step"] < 400
    assert out["steps"] == 400
    assert out["elastic"] == out["by_hand"]  # hex of every weight's bytes
    print(f"elastic: loss to next completed step {out['recovered_s']:.1f} s (replace_timeout_s 2); "
          f"regrouped in {shrink['seconds']:.1f} s, grew at step {grow['step']} in {grow['seconds']:.1f} s")


def test_below_min_workers_the_run_stops_naming_workers_minimum_and_checkpoint():
    out = run_script("below_min")
    assert out["kind"] == "WorkerFailure", out
    assert "1 worker(s) left, cluster.min_workers is 2" in out["error"]
    assert "last good checkpoint" in out["error"] and "step-0000" in out["error"]
