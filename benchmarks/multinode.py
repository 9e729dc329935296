"""Steps across nodes: actor calls, Ray's collectives and Ray Train on a real 3-node Ray on 127.0.0.1.

    python -m benchmarks.multinode            # 1,500 minibatch steps per run, 3 interleaved rounds
    python -m benchmarks.multinode --quick    # few steps: checks that everything runs

The cluster is started here with `ray start` (a head with no CPUs and two 1-CPU nodes, every
process on 127.0.0.1, token authentication with a token of its own, a temporary directory of its
own) and stopped at the end by killing exactly its processes: other Rays on the machine are left
alone. On it: distmlp minibatch steps (global batch 32, mnist-sample) with 2 workers on the two
nodes over actor calls and over the collective transport, the same with 4 workers (half a CPU
each), and, when torch and ray[train] are installed, a Ray Train TorchTrainer with 2 workers
spread over the two nodes (benchmarks.torch_rows' loop). Each row is the median over rounds of
the median step time of a run (the first 10 % of steps left out).
"""

import argparse
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# token authentication with a token of this run's own (read by Ray when it is imported, below),
# passed to the cluster it starts: it neither uses nor writes ~/.ray/auth_token
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))

from benchmarks.run import StepTimes, report  # noqa: E402
from distmlp import config, data, trainer, transport  # noqa: E402

FULL = {"steps": 1500, "rounds": 3, "train_steps": 1500}
QUICK = {"steps": 60, "rounds": 1, "train_steps": 60}
STOP_GRACE_S = 10  # after SIGTERM, the cluster's processes get this long before SIGKILL
# `ray start --address=...` for a node that joins: it refuses to run with
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps the head on loopback), and with it at 1 it
# replaces 127.0.0.1 in the address by the machine's address, where the head does not listen.
# So Ray's own CLI runs with that replacement off: every process stays on 127.0.0.1.
_NODE_ON_LOOPBACK = """
import sys
from ray._private import services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""


class LocalCluster:
    """A head (0 CPUs) and two 1-CPU nodes started with `ray start` on 127.0.0.1; stop() kills
    every process whose command line names this cluster's temporary directory, and their children."""

    def __init__(self, nodes=2):
        self.tmp = tempfile.mkdtemp(prefix="dmb-", dir="/tmp")  # short: Ray's socket paths must fit
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ)  # with this run's token
        ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
        common = ["--node-ip-address=127.0.0.1", f"--temp-dir={self.tmp}", "--disable-usage-stats"]
        try:
            self._run([ray_cli, "start", "--head", "--num-cpus=0", f"--port={self.port}",
                       "--include-dashboard=false", *common])
            for _ in range(nodes):
                self._run([sys.executable, "-c", _NODE_ON_LOOPBACK, "start", f"--address={self.address}",
                           "--num-cpus=1", *common], RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1")
        except BaseException:
            self.stop()
            raise

    def _run(self, cmd, **env):
        proc = subprocess.run(cmd, env=dict(self.env, **env), capture_output=True, text=True, timeout=180)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd[1:3])} failed: {proc.stderr.strip()[-2000:]}")

    def connect(self):
        import ray
        ray.init(address=self.address, _node_ip_address="127.0.0.1", log_to_driver=False,
                 logging_level="ERROR")

    def pids(self):
        """This cluster's processes: those naming its directory, and their descendants."""
        parents, own = {}, set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents[int(entry)] = ppid
            if self.tmp.encode() in cmdline:
                own.add(int(entry))
        grew = True
        while grew:
            more = {pid for pid, ppid in parents.items() if ppid in own} - own
            own |= more
            grew = bool(more)
        own.discard(os.getpid())
        return own

    def stop(self):
        pids = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + STOP_GRACE_S
            while (pids := pids & self.pids()) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not pids:
                break
        shutil.rmtree(self.tmp, ignore_errors=True)


def job(workers, transport_name, steps):
    return config.load_job(None, ["optimizer.name='minibatch'", "optimizer.batch_size=32", "optimizer.lr=0.05",
                                  f"run.steps={steps}", f"cluster.workers={workers}",
                                  f"cluster.cpus_per_worker={2 / workers:g}",
                                  f"cluster.transport='{transport_name}'"])


def distmlp_us(workers, transport_name, steps, source):
    """(median us per step, the transport that ran, nodes used) of one run."""
    backend = transport.start(source, job(workers, transport_name, steps))
    try:
        times = StepTimes()
        trainer.train(job(workers, transport_name, steps), backend, hooks=[times])
        return times.median("step_s") * 1e6, type(backend).__name__, len(backend.group.nodes())
    finally:
        backend.close()


def ray_train_us(steps):
    """Median us per step of a TorchTrainer with 2 workers spread over the two nodes."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from benchmarks import torch_rows
    with tempfile.TemporaryDirectory(prefix="distmlp-bench-ray-train-") as tmp:
        fit = TorchTrainer(torch_rows._train_loop, train_loop_config={"n": 8000, "steps": steps},
                           torch_config=torch_rows._loopback_torch_config(),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False,
                                                                  resources_per_worker={"CPU": 1},
                                                                  placement_strategy="STRICT_SPREAD"),
                           run_config=ray.train.RunConfig(storage_path=tmp, name="multinode")).fit()
        return fit.metrics["median_us"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps (smoke test)")
    args = parser.parse_args(argv)
    p = QUICK if args.quick else FULL
    load_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    with_torch = importlib.util.find_spec("torch") is not None
    with_train = with_torch and importlib.util.find_spec("ray.train.torch") is not None
    cluster = LocalCluster()
    import ray
    try:
        cluster.connect()
        source = data.resolve("mnist-sample")
        candidates = {(2, "actors"): [], (4, "actors"): []}
        if with_torch:
            candidates.update({(2, "collective"): [], (4, "collective"): []})
        ran = {}
        for _ in range(p["rounds"]):  # interleaved: the machine's load changes under every candidate alike
            for (workers, name), medians in candidates.items():
                us, ran[workers, name], nodes = distmlp_us(workers, name, p["steps"], source)
                if nodes != 2:
                    raise RuntimeError(f"{workers} workers ({name}) ran on {nodes} node(s), not 2")
                medians.append(us)
        train = statistics.median(ray_train_us(p["train_steps"]) for _ in range(p["rounds"])) if with_train else None
    finally:
        ray.shutdown()
        cluster.stop()
    us = {key: statistics.median(medians) for key, medians in candidates.items()}
    section = "minibatch step (batch 32), across 2 nodes"
    rows = []
    for workers in (2, 4):
        rows.append((section, f"Ray, actor calls, {workers} workers", f"{us[workers, 'actors']:,.0f} us/step",
                     f"{ran[workers, 'actors']}"))
        if with_torch:
            rows.append((section, f"Ray, collective allgather, {workers} workers",
                         f"{us[workers, 'collective']:,.0f} us/step", f"{ran[workers, 'collective']}"))
            rows.append(("", f"speed-up collective vs actor calls, {workers} workers",
                         f"{us[workers, 'actors'] / us[workers, 'collective']:.2f}x", ""))
    if train is not None:
        rows.append((section, "Ray Train TorchTrainer, 2 workers", f"{train:,.0f} us/step",
                     "STRICT_SPREAD, DDP (gloo) on 127.0.0.1; 16 examples each"))
        rows.append(("", "speed-up collective vs Ray Train, 2 workers", f"{train / us[2, 'collective']:.2f}x", ""))
    elif not with_torch:
        rows.append((section, "collective and Ray Train rows", "-", "torch not installed (optional extra 'bench')"))
    else:
        rows.append((section, "Ray Train TorchTrainer", "-", "ray[train] not installed (optional extra 'bench')"))
    report("distmlp multi-node benchmark", f"{'quick' if args.quick else 'full'}, {p['steps']} steps x {p['rounds']} rounds",
           load_start, rows)


if __name__ == "__main__":
    main()
