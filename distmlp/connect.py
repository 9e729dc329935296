"""Joining Ray: a cluster at an address, or an embedded local Ray of our own on loopback.

`connect` is called once per run by the driver; it fails in seconds with one line where
ray.init would retry an unreachable address for minutes.
"""

import logging
import os
import socket

import ray
from ray._private import ray_constants

from distmlp.errors import UserError


class ClusterError(UserError):
    """Ray could not be reached or could not place the workers."""


def connect(address=None, num_cpus=None):
    """Join a cluster (address or "auto"), or start an embedded local Ray; True if we started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _probe(address)
    if ray.is_initialized():
        return False
    quiet = dict(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True)
    if address:
        try:
            ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]}") from None
        return False
    # A local Ray of our own, on loopback only: Ray replaces 127.0.0.1 by the machine's address
    # (and listens on every interface) unless its single-machine mode is on, which the variable
    # below selects; Ray reads it when imported, so set it both for child processes and here.
    # address="local" keeps us from joining another Ray on this machine.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", **quiet)
    return True


def _probe(address, timeout_s=5.0):
    """Fail in seconds, with one line, where ray.init would retry an unreachable address for minutes."""
    if address == "auto":
        return
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"--address {address}: that is a dashboard / Jobs API address; "
                           "use `distmlp submit` for it, or give the cluster's HOST:PORT or 'auto'")
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from None


def disconnect():
    """Stop the embedded Ray that connect() started."""
    ray.shutdown()
