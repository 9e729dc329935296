"""How a round of steps crosses the workers: actor calls, the one-node mesh, or Ray's collectives.

Both are backends of the training loop (`run_steps(state, stop, plan)` -> trainer.Round,
`evaluate(params)`, `close()`) built on a WorkerGroup, which they use only through its public
methods. Both follow distmlp.step, so they give the same bits:

- ActorTransport: per step the driver puts the weights in the object store once, every worker
  with rows in the batch returns its gradient sums, the driver adds and applies them.
- MeshTransport (every worker on the driver's node): the workers exchange gradient sums
  through shared memory and apply the step themselves (distmlp.mesh); the driver starts a
  round with one call per worker and gets the weights back at its end.
- CollectiveTransport (workers on several nodes, torch installed): the same rounds, but the
  workers exchange gradient sums with one Ray collective allgather per step (distmlp.collective).

`start` places the workers and picks the transport (cluster.transport, "auto": the mesh when
every worker is on the driver's node, the collective when they span nodes and torch is
installed, actor calls otherwise).
"""

import importlib.util
import logging
import shutil
import time
import uuid

import numpy as np
import ray

from distmlp import collective, kernels, mesh, mlp, rounds, step, trainer, worker
from distmlp.connect import ClusterError
from distmlp.group import WorkerGroup

log = logging.getLogger("distmlp")


def start(source, job, worker_cls=worker.RemoteShardWorker, **placement):
    """Place and start job's workers on the connected Ray; the transport that drives them."""
    group = WorkerGroup(source, job, worker_cls, **placement)
    try:
        choice = job.cluster.transport
        on_one_node = mesh.eligible(group, ray.get_runtime_context().get_node_id())
        if choice == "mesh" and not on_one_node:
            raise ClusterError("cluster.transport = mesh needs every worker on the driver's node; "
                               f"the workers were placed on {len(set(group.bundle_nodes))} node(s) "
                               "(use transport auto or actors)")
        if choice in ("auto", "mesh") and on_one_node:
            n_items = sum(a * b + b for a, b in zip(job.model.sizes[:-1], job.model.sizes[1:]))
            rows = max(hi - lo for lo, hi in group.bounds)
            chunks = -(-rows // kernels.CHUNK_ROWS) if job.optimizer.name == "gd" else 0
            if mesh.room_for(group.workers, n_items, np.dtype(job.model.dtype).itemsize, chunks):
                return MeshTransport(group)
            log.warning("%s has too little free space for the workers' shared-memory slots; "
                        "steps go over actor calls", mesh.shm_dir())
        if choice == "collective" or (choice == "auto" and len(set(group.bundle_nodes)) > 1):
            if importlib.util.find_spec("torch") is not None:
                return CollectiveTransport(group)
            if choice == "collective":
                raise ClusterError("cluster.transport = collective needs torch: pip install 'distmlp[collective]'")
            log.warning("the workers span %d nodes: steps go over actor calls; Ray's collectives "
                        "would be faster (pip install 'distmlp[collective]', which adds torch)",
                        len(set(group.bundle_nodes)))
        return ActorTransport(group)
    except BaseException:
        group.close()
        raise


def evaluate(group, params):
    """(correct, loss sum, count) over the held-out split, every worker its shard, summed in rank order."""
    params_ref = ray.put(params)
    results = group.call({rank: ("evaluate", (params_ref,)) for rank in range(group.workers)}, "evaluation")
    correct = sum(r[0] for r in results.values())
    loss_sum = sum(results[rank][1] for rank in sorted(results))
    return correct, loss_sum, sum(r[2] for r in results.values())


class ActorTransport:
    """Every step over actor calls; the driver adds the gradient sums and applies the step."""

    def __init__(self, group):
        self.group = group
        self.workers, self.n_train, self.n_test = group.workers, group.n_train, group.n_test

    def run_steps(self, state, stop, plan):
        g, names = self.group, mlp.param_names(len(state.params) // 2)

        def compute(at, params):
            params_ref = ray.put(params)
            calls = {rank: ("grad_sums", (params_ref, rows, at))
                     for rank, rows in step.shares(plan.sampler.batch(at), g.bounds).items()}
            results = g.call(calls, f"step {at + 1}")
            parts, compute_s = [], 0.0
            for rank in sorted(results):
                tag, grads, loss_sum, count, seconds = results[rank]
                if tag != at:
                    raise RuntimeError(f"worker {rank} answered step {tag} during step {at}")
                parts.append((rank, step.flatten(grads, names), loss_sum, count))
                compute_s = max(compute_s, seconds)
            who = {rank: f"{rank} (pid {g.worker_info[rank]['pid']})" for rank in results}
            return parts, compute_s, who
        return trainer.run_round(state, stop, plan, compute, self.evaluate)

    def evaluate(self, params):
        return evaluate(self.group, params)

    def close(self):
        self.group.close()


class MeshTransport:
    """Rounds of steps over the workers' mesh (distmlp.mesh): every worker on the driver's node."""

    def __init__(self, group):
        self.group = group
        self.workers, self.n_train, self.n_test = group.workers, group.n_train, group.n_test
        self.actors = ActorTransport(group)  # rounds when the mesh keeps breaking with no worker lost
        mesh.sweep_stale()
        self.dir = mesh.make_dir()  # private (0700), kept until close
        self.gen, self.broken = 0, 0

    def run_steps(self, state, stop, plan):
        if self.broken >= mesh.MAX_MESH_FAILURES:
            return self.actors.run_steps(state, stop, plan)
        g, first = self.group, state.step
        start_ref = ray.put((state.params, state.opt_state))
        while True:
            request = {"gen": self.gen, "dir": self.dir, "workers": g.workers, "first": first, "stop": stop,
                       "sampler": plan.sampler, "lr": plan.lr, "momentum": plan.momentum,
                       "timeout": g.timeout, "round_s": trainer.ROUND_S,
                       "eval_every": plan.eval_every, "steps": plan.steps}
            t0 = time.perf_counter()
            calls = {rank: ("mesh_run", (start_ref, request)) for rank in range(g.workers)}
            # a healthy round can run two steps of up to the step timeout past ROUND_S: rank 0
            # decides to go on before its peers finish the step (which may take the timeout),
            # and the next step may take it too
            replies, failed = g.call_once(calls, trainer.ROUND_S + 2 * g.timeout + 5)
            if not failed:
                break
            steps = [r["step"] for r in replies.values() if r["status"] == rounds.BROKEN]
            g.replace(failed, f"step {min(steps) + 1}" if steps else f"steps {first + 1}-{stop}")
            self._next_generation()
        wall = time.perf_counter() - t0
        if any(r["status"] == rounds.BROKEN for r in replies.values()):  # no worker lost: a socket problem
            self.broken += 1
            self._next_generation()
            detail = next(r["detail"] for r in replies.values() if r["status"] == rounds.BROKEN)
            log.warning("worker mesh failed (%s); steps from %d go over actor calls", detail, first + 1)
            return self.actors.run_steps(state, stop, plan)
        return round_of(g, replies, wall, first)

    def evaluate(self, params):
        return evaluate(self.group, params)

    def _next_generation(self):
        """New sockets and slots (in a new directory) for the next attempt; the old ones go."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.gen += 1
        self.dir = mesh.make_dir()

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        self.group.close()


class CollectiveTransport:
    """Rounds of steps over a Ray collective group of the workers (distmlp.collective), one
    group per generation: a new one after any failure or change of workers."""

    def __init__(self, group):
        self.group = group
        self.workers, self.n_train, self.n_test = group.workers, group.n_train, group.n_test
        self.actors = ActorTransport(group)  # rounds when the group keeps breaking with no worker lost
        self.run_id = uuid.uuid4().hex[:12]  # group names are unique to this run
        self.gen, self.broken = 0, 0

    def run_steps(self, state, stop, plan):
        if self.broken >= collective.MAX_BROKEN:
            return self.actors.run_steps(state, stop, plan)
        g, first = self.group, state.step
        start_ref = ray.put((state.params, state.opt_state))
        while True:
            request = {"group": f"distmlp-{self.run_id}-{self.gen}", "workers": g.workers, "first": first,
                       "stop": stop, "sampler": plan.sampler, "lr": plan.lr, "momentum": plan.momentum,
                       "timeout": g.timeout, "round_s": trainer.ROUND_S,
                       "eval_every": plan.eval_every, "steps": plan.steps}
            t0 = time.perf_counter()
            calls = {rank: ("collective_run", (start_ref, request)) for rank in range(g.workers)}
            # forming a group may take the step timeout, and a healthy round can run two steps of
            # up to the step timeout past ROUND_S (rank 0 decides to go on before its peers finish)
            replies, failed = g.call_once(calls, trainer.ROUND_S + 3 * g.timeout + 5)
            if not failed:
                break
            steps = [r["step"] for r in replies.values() if r["status"] == rounds.BROKEN]
            g.replace(failed, f"step {min(steps) + 1}" if steps else f"steps {first + 1}-{stop}")
            self.gen += 1
        wall = time.perf_counter() - t0
        broken = [r["detail"] for r in replies.values() if r["status"] == rounds.BROKEN]
        if broken:  # no worker lost: the group itself failed; this round goes over actor calls
            self.broken += 1
            self.gen += 1
            log.warning("collective group failed (%s); steps from %d go over actor calls", broken[0], first + 1)
            return self.actors.run_steps(state, stop, plan)
        return round_of(g, replies, wall, first)

    def evaluate(self, params):
        return evaluate(self.group, params)

    def close(self):
        self.group.close()


def round_of(g, replies, wall, first):
    """The trainer.Round of a round the workers ran themselves: {rank: reply of
    mesh.MeshWorker.run or collective.CollectiveWorker.run}, wall seconds it took."""
    done = {len(r["steps"]) for r in replies.values()}
    prints = {r["fingerprint"] for r in replies.values()}
    if len(done) != 1 or len(prints) != 1:
        raise RuntimeError(f"workers disagree after step {first}: steps {done}, weights {len(prints)} kinds")
    n = done.pop()
    lead = replies[0]
    records = []
    if n:
        # a step takes as long as its slowest worker; the round's own overhead is spread over its steps
        columns = {rank: tuple(zip(*r["steps"])) for rank, r in replies.items()}  # (loss sums, counts, compute, step)
        compute_s, slowest = (_each_max([c[i] for c in columns.values()]) for i in (2, 3))
        evaluating = max(r["eval_s"] for r in replies.values())  # not a step's time
        overhead = max(wall - sum(slowest) - evaluating, 0.0) / n
        records = list(map(trainer.StepRecord, columns[0][0], columns[0][1], compute_s,
                           [s + overhead for s in slowest]))
    nonfinite = None
    if lead["nonfinite"] is not None:
        loss_sum, count, what, rank = lead["nonfinite"]
        who = None if rank is None else f"{rank} (pid {g.worker_info[rank]['pid']})"
        nonfinite = trainer.NonFinite(loss_sum, count, what, who)
    # every worker evaluated its shard of the held-out split after the same steps: summed as evaluate() does
    ranks = sorted(replies)
    evals = {done: (sum(replies[rank]["evals"][i][1] for rank in ranks),
                    sum(replies[rank]["evals"][i][2] for rank in ranks),
                    sum(replies[rank]["evals"][i][3] for rank in ranks))
             for i, (done, *_) in enumerate(lead["evals"])}
    return trainer.Round(records, lead["params"], lead["opt_state"], nonfinite, evals)


def _each_max(columns):
    """The elementwise maximum of equally long sequences (one per worker), as a sequence."""
    return columns[0] if len(columns) == 1 else list(map(max, *columns))
