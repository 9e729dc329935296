import os

import pytest


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (2 CPUs, loopback only, no dashboard)."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture
def sample_dir():
    """The shared real MNIST test split (IDX, gzip)."""
    here = os.path.dirname(__file__)
    return os.path.join(here, "..", "..", "shared", "data", "mnist")
