"""Placing the workers: a request the cluster's nodes can never hold fails at once unless an
autoscaler can add nodes (then it waits and says for what). Ray is faked here; the real case,
a `ray start` head without an autoscaling config, is in test_submit.py."""

import json
import logging

import pytest

from distmlp import config, group
from distmlp.connect import ClusterError


def cluster(workers, cpus, placement="SPREAD"):
    return config.load_job(None, [f"cluster.workers={workers}", f"cluster.cpus_per_worker={cpus}",
                                  f"cluster.placement='{placement}'"]).cluster


@pytest.mark.parametrize("placement, workers, cpus, nodes, fits", [
    ("SPREAD", 3, 1, [2.0], False),
    ("SPREAD", 2, 1, [2.0], True),
    ("PACK", 4, 0.5, [1.0, 1.0], True),
    ("PACK", 3, 0.75, [1.0, 1.0], False),  # 0.75 + 0.75 does not fit in a 1-CPU node
    ("STRICT_SPREAD", 2, 1, [4.0], False),
    ("STRICT_SPREAD", 2, 1, [0.0, 1.0, 1.0], True),
    ("STRICT_PACK", 2, 1, [1.0, 1.0], False),
    ("STRICT_PACK", 3, 0.1, [0.3], True),  # 3 x 0.1 in float is 0.30000000000000004
])
def test_shortfall_knows_what_can_never_fit(placement, workers, cpus, nodes, fits):
    short = group.shortfall(cluster(workers, cpus, placement), nodes)
    assert (short is None) == fits
    if not fits:
        assert f"{len(nodes)} node(s) have" in short


class FakeRay:
    """ray.wait never ready; nodes of the CPUs given; remove_placement_group recorded."""

    def __init__(self, monkeypatch, cpus):
        self.waits, self.removed = [], []
        monkeypatch.setattr(group.ray, "wait", lambda refs, timeout: (self.waits.append(timeout), ([], refs))[1])
        monkeypatch.setattr(group.ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": c}} for c in cpus])
        monkeypatch.setattr(group.ray, "cluster_resources", lambda: {"CPU": sum(cpus)})
        monkeypatch.setattr(group, "remove_placement_group", self.removed.append)


class FakePG:
    def ready(self):
        return "ref"


def test_without_an_autoscaler_an_impossible_request_fails_after_one_check(monkeypatch):
    fake = FakeRay(monkeypatch, [1.0, 1.0])
    monkeypatch.setattr(group, "autoscaler_can_add_nodes", lambda: False)
    pg = FakePG()
    with pytest.raises(ClusterError, match=r"cannot place 3 workers of 1 CPU each \(SPREAD\): the cluster's 2 "
                                           r"node\(s\) have 1, 1 CPU \(2 in all\), and no autoscaler"):
        group._await_placement(pg, cluster(3, 1), timeout_s=60)
    assert fake.waits == [group.PLACE_CHECK_S] and fake.removed == [pg]


def test_with_an_autoscaler_it_says_what_it_waits_for_then_times_out(monkeypatch, caplog):
    fake = FakeRay(monkeypatch, [1.0])
    monkeypatch.setattr(group, "autoscaler_can_add_nodes", lambda: True)
    with caplog.at_level(logging.WARNING, logger="distmlp"), pytest.raises(ClusterError, match="within 60 s"):
        group._await_placement(FakePG(), cluster(2, 1), timeout_s=60)
    assert "waiting up to 60 s for the autoscaler to add nodes" in caplog.text
    assert len(fake.waits) == 2 and fake.waits[1] > 50


def test_a_request_that_fits_on_busy_nodes_waits_without_a_message(monkeypatch, caplog):
    fake = FakeRay(monkeypatch, [2.0])
    monkeypatch.setattr(group, "autoscaler_can_add_nodes", lambda: pytest.fail("not asked when the nodes can hold it"))
    with caplog.at_level(logging.WARNING, logger="distmlp"), pytest.raises(ClusterError, match="within 60 s"):
        group._await_placement(FakePG(), cluster(2, 1), timeout_s=60)
    assert caplog.text == "" and len(fake.waits) == 2


@pytest.mark.parametrize("report, can", [
    (None, False),  # no monitor report yet
    ({"autoscaler_report": {"node_type_mapping": {"127.0.0.1": "node_86c95d6b15"}}}, False),  # read-only
    ({"autoscaler_report": {"node_type_mapping": {"10.0.0.1": "ray.head.default",
                                                  "10.0.0.2": "ray.worker.default"}}}, True),
    ({"load_metrics_report": {}}, False),
])
def test_the_monitor_report_tells_a_read_only_autoscaler_from_one_that_launches(monkeypatch, report, can):
    import ray.autoscaler.v2.utils
    import ray.experimental.internal_kv

    monkeypatch.setattr(ray.autoscaler.v2.utils, "is_autoscaler_v2", lambda: False)
    value = None if report is None else json.dumps(report).encode()
    monkeypatch.setattr(ray.experimental.internal_kv, "_internal_kv_get", lambda key: value)
    assert group.autoscaler_can_add_nodes() is can
