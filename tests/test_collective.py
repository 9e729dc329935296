"""The collective transport (Ray's collectives across nodes) against actor calls, bit for bit, and
its recovery from faults; on a multi-node ray.cluster_utils.Cluster in a subprocess
(tests/multinode_collective.py)."""

import functools

import pytest

import test_multinode
from distmlp import collective, config

run_script = functools.partial(test_multinode.run_script, timeout=600, script="multinode_collective.py")


def test_the_loopback_address_is_on_the_loopback_interface():
    assert collective.interface_of("127.0.0.1") == "lo"
    with pytest.raises(collective.CollectiveBroken, match="192.0.2.1"):
        collective.interface_of("192.0.2.1")  # TEST-NET-1: on no interface here


def test_the_transport_name_is_a_cluster_setting():
    assert config.load_job(None, ["cluster.transport='collective'"]).cluster.transport == "collective"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_collective_equals_actor_calls_bit_for_bit_across_nodes(workers):
    """minibatch, gd and momentum: same weights, same loss at every step, same evaluations;
    2 workers on two 1-CPU nodes, or 4 on two 2-CPU nodes."""
    pytest.importorskip("torch")
    out = run_script("equal", str(workers))
    for case in ("minibatch", "gd", "momentum"):
        actors, coll = out[case]["actors"], out[case]["collective"]
        assert (actors["transport"], coll["transport"]) == ("ActorTransport", "CollectiveTransport")
        assert len(set(coll["nodes"])) == 2 and len(coll["nodes"]) == workers
        assert coll["steps"] == actors["steps"] > 0
        assert coll["params"] == actors["params"], case  # hex of every weight's bytes
        assert coll["losses"] == actors["losses"], case
    assert out["auto"] == "CollectiveTransport"
    assert out["auto_without_torch"] == "ActorTransport"
    notes = [w for w in out["warnings"] if "distmlp[collective]" in w]
    assert len(notes) == 1 and "span 2 nodes" in notes[0]


def check_recovered(out):
    failed, clean = out["failed"], out["clean"]
    assert failed["transport"] == "CollectiveTransport" and clean["transport"] == "ActorTransport"
    assert failed["failures"] == 1 and failed["steps"] == clean["steps"]
    assert failed["params"] == clean["params"] and failed["losses"] == clean["losses"]


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_round_recovers_bit_identical():
    """Worker 1 is SIGKILLed while it computes step 5 of a round: its peer's allgather fails,
    the driver restarts it, a new group runs the round again from step 3."""
    pytest.importorskip("torch")
    out = run_script("kill")
    check_recovered(out)
    assert len(out["killed"]) == 1 and out["alive"] == [False]
    restarts = [w for w in out["warnings"] if "restarting" in w]
    assert len(restarts) == 1 and f"worker 1 (pid {out['killed'][0]}" in restarts[0]
    assert "died during step 5" in restarts[0]


@pytest.mark.slow
def test_a_hung_worker_times_out_its_peer_and_is_replaced_bit_identical():
    """Worker 0 is SIGSTOPped after step 2 (cluster.step_timeout_s = 5): its peer's allgather
    times out instead of waiting for torch's 30-minute default, the driver kills and replaces it."""
    pytest.importorskip("torch")
    out = run_script("hang")
    check_recovered(out)
    assert out["alive"] == [False], "the hung worker process was not killed"
    assert any("worker 0" in w and "timed out" in w for w in out["warnings"])


@pytest.mark.slow
def test_losing_a_node_mid_run_recovers_on_a_new_node_bit_identical():
    pytest.importorskip("torch")
    out = run_script("node_loss")
    check_recovered(out)
    assert out["failed"]["nodes"][1] == out["added"] != out["removed"]
    assert out["removed"] not in out["failed"]["nodes"]
    print(f"node loss over the collective: recovered in {out['recovery_s']:.1f} s")
