"""The collective transport's settings; its runs across real nodes are in test_realnodes.py."""

import pytest

from distmlp import collective, config


def test_the_loopback_address_is_on_the_loopback_interface():
    assert collective.interface_of("127.0.0.1") == "lo"
    with pytest.raises(collective.CollectiveBroken, match="192.0.2.1"):
        collective.interface_of("192.0.2.1")  # TEST-NET-1: on no interface here


def test_the_transport_name_is_a_cluster_setting():
    assert config.load_job(None, ["cluster.transport='collective'"]).cluster.transport == "collective"
