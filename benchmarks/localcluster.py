"""A real Ray cluster on this machine, for benchmarks and tests: a head and nodes, each its own
`ray start --block` process in its own process group.

Every process is on 127.0.0.1, in a temporary directory of the cluster's own, with token
authentication by a token of the cluster's own (RAY_AUTH_TOKEN in `env`: neither ~/.ray/auth_token
nor the caller's environment is used or changed). A node is removed by signalling its process
group (SIGKILL: the node is lost; SIGTERM: `ray start --block` stops what it started); stop()
does that to every node, then the head.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distmlp import connect

START_TIMEOUT_S = 120
STOP_GRACE_S = 10  # after SIGTERM, a `ray start --block` gets this long before its group is killed
STARTED = "Ray runtime started."  # what `ray start` prints once the node runs
# `ray start --address=...` for a node that joins: it refuses to run with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps the head on loopback), and with it at 1 it
# replaces 127.0.0.1 in the address by the machine's address, where the head does not listen.
# So Ray's own CLI runs with that replacement off (a private function): every process stays on 127.0.0.1.
_NODE_ON_LOOPBACK = """
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_node(address, temp_dir, env, cpus):
    """(process, node manager port) of a node that joined the head at address, once it runs."""
    port = free_port()
    return _start([sys.executable, "-c", _NODE_ON_LOOPBACK, "start", f"--address={address}", f"--num-cpus={cpus}",
                   f"--node-manager-port={port}"], temp_dir, dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")), port


def _start(cmd, temp_dir, env):
    """A `ray start ... --block` in a session of its own (logging to temp_dir), once it printed STARTED."""
    cmd += ["--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    log = Path(tempfile.mkstemp(prefix="start-", suffix=".log", dir=temp_dir)[1])
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while STARTED not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_node(proc)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            what = next(a for a in cmd if a.startswith(("--head", "--address")))
            raise RuntimeError(f"ray start {what} did not start:\n{tail}")
        time.sleep(0.2)
    return proc


def stop_node(proc, sig=signal.SIGTERM):
    """Send sig to a `ray start --block` (SIGTERM: it stops its node), then kill what is left of its group."""
    if sig == signal.SIGTERM and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class LocalCluster:
    """A head with no CPUs and `nodes` nodes of `cpus` CPUs, started with `ray start` on 127.0.0.1."""

    def __init__(self, nodes=2, cpus=1):
        self.tmp = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")  # short: Ray's socket paths must fit
        self.cpus = cpus
        self.address = f"127.0.0.1:{free_port()}"
        # each node's start, like an embedded one, without the raylet's one-second retry (connect.CONNECT_RETRY)
        self.env = dict(connect.CONNECT_RETRY) | dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
                        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        self.head, self.nodes = None, {}  # node manager port: its `ray start` process
        try:
            ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
            self.head = _start([ray_cli, "start", "--head", "--num-cpus=0", f"--port={self.address.split(':')[1]}",
                                "--include-dashboard=false"], self.tmp, self.env)
            self.restore(nodes)
        except BaseException:
            self.stop()
            raise

    def restore(self, nodes):
        """Forget the nodes whose process ended (removed by anyone), start nodes until there are `nodes`."""
        self.nodes = {port: proc for port, proc in self.nodes.items() if proc.poll() is None}
        while len(self.nodes) < nodes:
            proc, port = start_node(self.address, self.tmp, self.env, self.cpus)
            self.nodes[port] = proc

    def connect(self):
        """Join this cluster as a distmlp run does (distmlp.connect finds the token in RAY_AUTH_TOKEN)."""
        os.environ["RAY_AUTH_TOKEN"] = self.env["RAY_AUTH_TOKEN"]
        connect.connect(self.address)

    def stop(self):
        for proc in [*self.nodes.values(), *([self.head] if self.head else [])]:
            stop_node(proc)
        shutil.rmtree(self.tmp, ignore_errors=True)
