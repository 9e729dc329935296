"""Multi-node placement with ray.cluster_utils.Cluster (in a subprocess: one Ray per process)."""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(__file__)


def run_script(*args, timeout=300):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "multinode.py"), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_workers_spread_over_two_nodes_and_match_one_worker():
    out = run_script("placement")
    two, one = out["2"], out["1"]
    assert len(set(two["nodes"])) == 2, "SPREAD placement put both workers on one node"
    for name in one["params"]:
        np.testing.assert_allclose(np.array(two["params"][name]), np.array(one["params"][name]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
    assert abs(two["accuracy"] - one["accuracy"]) <= 1e-3
