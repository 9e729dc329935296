import os

import pytest

# Keep every Ray this test session starts (and its subprocesses) on 127.0.0.1: without this
# Ray swaps 127.0.0.1 for the machine's address and listens on all interfaces.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (2 CPUs, loopback only, no dashboard)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture
def sample_dir():
    """The shared real MNIST test split (IDX, gzip)."""
    here = os.path.dirname(__file__)
    return os.path.join(here, "..", "..", "shared", "data", "mnist")
