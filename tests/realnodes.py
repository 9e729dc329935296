"""Run by tests in a fresh interpreter: the collective transport on a real multi-node Ray.

The cluster (benchmarks.localcluster: a head with no CPUs and two 1-CPU nodes, each a
`ray start --block` on 127.0.0.1) is the test's; this script joins it with the token in
RAY_AUTH_TOKEN and prints one JSON line:

    equal CLUSTER WORKERS  every case of CASES over actor calls and over the collective transport
                           (2 / WORKERS CPUs per worker); gd through the transport "auto" picks,
                           as if torch were not installed (actor calls) and with it (the collective)
    kill CLUSTER           worker 1 SIGKILLed in the middle of a round (it sleeps in step 5)
    hang CLUSTER           worker 0 SIGSTOPped: its peer times out, the driver replaces it
    node_loss CLUSTER      the node of worker 1 killed after step 2 and a fresh node started

CLUSTER is JSON: {"address", "tmp", "cpus", "nodes": {node manager port: process group}}; a node
this script starts it also stops. Weights go out as the hex of their bytes, so the test compares bits.
"""

import json
import logging
import os
import signal
import sys
import threading
import time

import ray

from benchmarks.localcluster import start_node, stop_node
from distmlp import config, connect, data, trainer, transport
from distmlp.worker import ShardWorker
from hooks import AtStep, alive, kill
from multinode import note_recovery

CASES = {"minibatch": ["optimizer.name='minibatch'", "run.steps=12"],
         "gd": ["optimizer.name='gd'", "run.steps=4"],
         "momentum": ["optimizer.name='minibatch'", "optimizer.momentum=0.9", "run.steps=12"]}


def job_for(case, workers, transport_name, *more):
    return config.load_job(None, [*CASES[case], "optimizer.lr=0.1", "run.seed=3", "run.eval_every=4",
                                  f"cluster.workers={workers}", f"cluster.transport='{transport_name}'",
                                  f"cluster.cpus_per_worker={2 / workers:g}", *more])


class Losses(trainer.Hook):
    """Every step's training loss and every evaluation, as the loop reports them."""

    def __init__(self, backend):
        self.seen = []

    def on_step(self, state, record):
        self.seen.append([record["train_loss"], record.get("test_loss"), record.get("test_accuracy")])


def train(job, source, hooks=(), worker_cls=None):
    """(summary dict, backend) of job: weights as hex, per-step losses, the transport's name."""
    backend = transport.start(source, job, **({"worker_cls": worker_cls} if worker_cls else {}))
    try:
        made = [h(backend) for h in (Losses, *hooks)]
        state = trainer.train(job, backend, hooks=made)
        return {"params": {k: v.tobytes().hex() for k, v in state.params.items()}, "steps": state.step,
                "losses": made[0].seen, "transport": type(backend).__name__,
                "nodes": [i["node_id"] for i in backend.group.worker_info],
                "failures": backend.group.failures}, backend
    finally:
        backend.close()


def equal(cluster, workers):
    connect.connect(cluster["address"])
    try:
        source = data.resolve("mnist-sample")
        every_case = int(workers) == 2  # 4 workers: the minibatch case; the rest is the same code with 2
        out = {case: {name: train(job_for(case, workers, name), source)[0] for name in ("actors", "collective")}
               for case in (("minibatch", "momentum") if every_case else ("minibatch",))}
        if not every_case:
            print(json.dumps(out))
            return
        # gd compares the two transports that "auto" picks, with torch and as if it were not installed
        warned = Warnings()
        logging.getLogger("distmlp").addHandler(warned)
        find_spec = transport.importlib.util.find_spec
        transport.importlib.util.find_spec = lambda name: None
        try:
            actors = train(job_for("gd", workers, "auto"), source)[0]
        finally:
            transport.importlib.util.find_spec = find_spec
            logging.getLogger("distmlp").removeHandler(warned)
        out["gd"] = {"actors": actors, "collective": train(job_for("gd", workers, "auto"), source)[0]}
        out["auto"], out["auto_without_torch"] = out["gd"]["collective"]["transport"], actors["transport"]
        out["warnings"] = warned.seen
        print(json.dumps(out))
    finally:
        ray.shutdown()


class SlowAtStep(ShardWorker):
    """Rank 1 sleeps 1.5 s in step index 4, so a kill lands in the middle of a round."""

    def grad_sums(self, params, local_indices, step, shared=None):
        if self.rank == 1 and step == 4:
            time.sleep(1.5)
        return super().grad_sums(params, local_indices, step, shared)


def kill_later(rank, delay_s, log):
    """Action: SIGKILL worker rank delay_s from now, from a timer thread (mid-round)."""
    def action(backend):
        pid = backend.group.worker_info[rank]["pid"]
        threading.Timer(delay_s, lambda: (os.kill(pid, signal.SIGKILL), log.append(pid))).start()
    return action


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())


def replace_node(cluster, rank, events, started):
    """Action: SIGKILL the process group of the node hosting worker rank and start a fresh node."""
    def action(backend):
        node_id = backend.group.worker_info[rank]["node_id"]
        port = next(n["NodeManagerPort"] for n in ray.nodes() if n["NodeID"] == node_id)
        events["removed"], events["t_removed"] = node_id, time.perf_counter()
        os.killpg(cluster["nodes"][str(port)], signal.SIGKILL)
        proc, port = start_node(cluster["address"], cluster["tmp"], os.environ, cluster["cpus"])
        started.append(proc)
        events["added"] = next(n["NodeID"] for n in ray.nodes() if n["NodeManagerPort"] == port and n["Alive"])
    return action


def faults(cluster, mode):
    connect.connect(cluster["address"])
    warned = Warnings()
    logging.getLogger("distmlp").addHandler(warned)
    events, killed, started = {}, [], []
    try:
        source = data.resolve("mnist-sample")
        out = {"clean": train(job_for("minibatch", 2, "actors", "run.steps=8"), source)[0]}
        job = job_for("minibatch", 2, "collective", "run.steps=8", "cluster.step_timeout_s=5")
        t0 = time.perf_counter()
        if mode == "kill":
            # the round after step 2 runs steps 3..8; worker 1 sleeps in step 5 and dies there
            out["failed"], backend = train(job, source, [AtStep(2, kill_later(1, 0.4, killed))], ray.remote(SlowAtStep))
        elif mode == "hang":
            try:
                out["failed"], backend = train(job, source, [AtStep(2, kill(0, signal.SIGSTOP, log=killed))])
            finally:
                for pid, _ in killed:
                    if alive(pid):
                        os.kill(pid, signal.SIGCONT)
                        os.kill(pid, signal.SIGKILL)
            killed = [pid for pid, _ in killed]
        else:
            out["failed"], backend = train(job, source, [AtStep(2, replace_node(cluster, 1, events, started)),
                                                         AtStep(3, note_recovery(events))])
        out.update(events, wall_s=time.perf_counter() - t0, killed=killed, warnings=warned.seen,
                   alive=[alive(pid) for pid in killed])
        print(json.dumps(out))
    finally:
        ray.shutdown()
        for proc in started:
            stop_node(proc)


if __name__ == "__main__":
    if sys.argv[1] == "equal":
        equal(json.loads(sys.argv[2]), int(sys.argv[3]))
    else:
        faults(json.loads(sys.argv[2]), sys.argv[1])
