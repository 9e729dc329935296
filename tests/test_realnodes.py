"""The collective transport across real nodes against actor calls, bit for bit, and its recovery
from faults: a head from `ray start --head` and two 1-CPU nodes from `ray start --address`, all on
127.0.0.1 with a token of their own (benchmarks.localcluster), shared by every test here; each
test is a driver script in a subprocess (tests/realnodes.py) and finds the cluster with two nodes."""

import json
import os
from unittest import mock

import pytest

import test_multinode
from benchmarks.localcluster import LocalCluster
from multinode import FAST_NODE_DEATH

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = 2


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("torch")
    # the head's GCS reads Ray's settings from RAY_<name> in its environment
    with mock.patch.dict(os.environ, {f"RAY_{name}": str(value) for name, value in FAST_NODE_DEATH.items()}):
        started = LocalCluster(nodes=NODES, cpus=1)
    try:
        yield started
    finally:
        started.stop()


def run_script(cluster, mode, *args):
    """The JSON line of tests/realnodes.py MODE run against cluster, after restoring its two nodes."""
    cluster.restore(NODES)
    described = {"address": cluster.address, "tmp": cluster.tmp, "cpus": cluster.cpus,
                 "nodes": {port: proc.pid for port, proc in cluster.nodes.items()}}
    env = dict(cluster.env, PYTHONPATH=os.pathsep.join([ROOT, cluster.env.get("PYTHONPATH", "")]))
    return test_multinode.run_script(mode, json.dumps(described), *args, timeout=600, script="realnodes.py", env=env)


@pytest.mark.parametrize("workers", [2, 4])
def test_collective_equals_actor_calls_bit_for_bit_across_nodes(cluster, workers):
    """minibatch, gd and momentum with 2 workers on the two nodes, minibatch with 4 (half a CPU
    each): same weights, same loss at every step, same evaluations; and what auto picks."""
    out = run_script(cluster, "equal", str(workers))
    cases = ("minibatch", "gd", "momentum") if workers == 2 else ("minibatch",)
    assert sorted(case for case in out if case in ("minibatch", "gd", "momentum")) == sorted(cases)
    for case in cases:
        actors, coll = out[case]["actors"], out[case]["collective"]
        assert (actors["transport"], coll["transport"]) == ("ActorTransport", "CollectiveTransport")
        assert len(set(coll["nodes"])) == 2 and len(coll["nodes"]) == workers
        assert coll["steps"] == actors["steps"] > 0
        assert coll["params"] == actors["params"], case  # hex of every weight's bytes
        assert coll["losses"] == actors["losses"], case
    if workers != 2:
        return
    assert out["auto"] == "CollectiveTransport"
    assert out["auto_without_torch"] == "ActorTransport"
    notes = [w for w in out["warnings"] if "distmlp[collective]" in w]
    assert len(notes) == 1 and "span 2 nodes" in notes[0]


def check_recovered(out):
    failed, clean = out["failed"], out["clean"]
    assert failed["transport"] == "CollectiveTransport" and clean["transport"] == "ActorTransport"
    assert failed["failures"] == 1 and failed["steps"] == clean["steps"]
    assert failed["params"] == clean["params"] and failed["losses"] == clean["losses"]


def test_a_worker_killed_in_the_middle_of_a_round_recovers_bit_identical(cluster):
    """Worker 1 is SIGKILLed while it computes step 5 of a round: its peer's allgather fails,
    the driver restarts it, a new group runs the round again from step 3."""
    out = run_script(cluster, "kill")
    check_recovered(out)
    assert len(out["killed"]) == 1 and out["alive"] == [False]
    restarts = [w for w in out["warnings"] if "restarting" in w]
    assert len(restarts) == 1 and f"worker 1 (pid {out['killed'][0]}" in restarts[0]
    assert "died during step 5" in restarts[0]


def test_a_hung_worker_times_out_its_peer_and_is_replaced_bit_identical(cluster):
    """Worker 0 is SIGSTOPped after step 2 (cluster.step_timeout_s = 5): its peer's allgather
    times out instead of waiting for torch's 30-minute default, the driver kills and replaces it."""
    out = run_script(cluster, "hang")
    check_recovered(out)
    assert out["alive"] == [False], "the hung worker process was not killed"
    assert any("worker 0" in w and "timed out" in w for w in out["warnings"])


def test_losing_a_node_mid_run_recovers_on_a_new_node_bit_identical(cluster):
    """The process group of worker 1's node is SIGKILLed after step 2 and a new node joins."""
    out = run_script(cluster, "node_loss")
    check_recovered(out)
    assert out["failed"]["nodes"][1] == out["added"] != out["removed"]
    assert out["removed"] not in out["failed"]["nodes"]
    print(f"node loss over the collective: recovered in {out['recovery_s']:.1f} s")
