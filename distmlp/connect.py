"""Joining Ray: a cluster at an address, or an embedded local Ray of our own on loopback.

`connect` is called once per run by the driver; it fails in seconds with one line where
ray.init would retry an unreachable address, or one that refuses its auth token, for minutes.
A cluster's auth token is found where `distmlp submit` finds it (jobs_api.auth_headers).
"""

import logging
import os
import socket

import ray
from ray._private import ray_constants

from distmlp.errors import UserError
from distmlp.jobs_api import auth_headers, token_help


class ClusterError(UserError):
    """Ray could not be reached or could not place the workers."""


# Ray's processes connect to each other's Unix sockets with retries, by default 10 tries a second
# apart. The raylet tries its object store's socket while another of its threads is still
# starting the store, often too early: one embedded start in three took a second longer (3.2 s
# against 2.2 s). The same 10 s of tries, 20 ms apart. Ray reads these two settings of its
# system config from RAY_<name> variables in its processes' environment; no public API sets them.
CONNECT_RETRY = {"RAY_raylet_client_connect_timeout_milliseconds": "20",
                 "RAY_raylet_client_num_connect_attempts": "500"}


def quick_retries():
    """Give the Ray processes started from this process CONNECT_RETRY (values already set win)."""
    for name, value in CONNECT_RETRY.items():
        os.environ.setdefault(name, value)


def connect(address=None, num_cpus=None):
    """Join a cluster (address or "auto"), or start an embedded local Ray; True if we started it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        _probe(address)
        _authenticate(address)
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
    quick_retries()
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             _node_ip_address="127.0.0.1", **quiet)
    return True


def _authenticate(address, timeout_s=5.0):
    """Send the Ray auth token when one is found; fail in one line when the cluster refuses us.

    Ray's client sends a token only with RAY_AUTH_MODE=token, while `ray start --head` turns
    token auth on by itself when ~/.ray/auth_token exists; so a token found in Ray's usual places
    turns the mode on for this process (and the workers it starts), unless RAY_AUTH_MODE is set.
    A HOST:PORT cluster is then asked for its id, which needs the token, before ray.init.
    """
    headers = auth_headers()
    if headers and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
        ray._raylet.Config.initialize("")  # re-read by this process too, as Ray's own ray.init does
    if address == "auto" or "://" in address:
        return  # not a GCS address we can ask
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=list(headers.items()))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                what = "rejected the Ray auth token" if headers else "requires a Ray auth token and none was found"
                raise ClusterError(f"the Ray cluster at {address} {what}; {token_help()}") from None
            # anything else (TLS, an old Ray): ray.init reports it


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
