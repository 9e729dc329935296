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

    from distmlp import connect
    connect.quick_retries()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture
def sample_dir():
    """The shared real MNIST test split (IDX, gzip)."""
    here = os.path.dirname(__file__)
    return os.path.join(here, "..", "..", "shared", "data", "mnist")


# The fast subset (`pytest -m "not slow"`, under 2 minutes) skips what starts clusters or
# subprocess runs, runs thousands of steps or sleeps: every test that uses Ray, but for the few
# below that cover the engine's modules (worker group, both transports, worker, mesh) in one
# short Ray session; and whole modules that are all subprocess runs or clusters.
SLOW_MODULES = {"test_benchmarks", "test_faults", "test_multinode", "test_realnodes", "test_resume"}
FAST_RAY_TESTS = {
    "test_mesh.py::test_mesh_equals_actor_calls_bit_for_bit[minibatch-2]",
    "test_engine.py::test_minibatch_indices_go_to_their_owner",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("/")[-1]
        uses_ray = {"ray_session", "head"} & set(getattr(item, "fixturenames", ()))
        if item.module.__name__ in SLOW_MODULES or (uses_ray and name not in FAST_RAY_TESTS):
            item.add_marker(pytest.mark.slow)
