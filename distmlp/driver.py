"""The Ray driver: starts the worker actors, sums their partial results, runs the job.

One step: the driver puts the weights in the object store once, sends the reference and each
worker's share of the step's examples, adds the returned gradient sums in rank order (so the
result is deterministic) and hands them to the training loop, which divides by the total count
and updates. 1 worker and N workers run this same code. On one node MeshTransport runs rounds of
steps in which the workers do this summing and updating among themselves (distmlp.mesh).
"""

import logging
import os
import shutil
import tempfile
import time

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distmlp import data, fastpath, mesh, optim, trainer
from distmlp.connect import ClusterError, connect  # noqa: F401  (ClusterError: part of this module's face)
from distmlp.errors import UserError
from distmlp.worker import BLAS_ENV, RemoteShardWorker

log = logging.getLogger("distmlp")


class WorkerFailure(UserError, RuntimeError):
    """Workers failed more often than cluster.max_failures allows, or one could not be restarted."""


# A worker is lost when its process (or its node) died, or its result went with its node.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
RESTART_TIMEOUT_S = 120  # a replacement worker must have loaded its shard by then
RESTART_PAUSE_S = 1.0  # before starting again a replacement that died while starting


class RayBackend:
    """Worker actors, one shard each, placed by a placement group."""

    def __init__(self, source, job, worker_cls=RemoteShardWorker):
        c = job.cluster
        self.workers = c.workers
        self.n_train, self.n_test = source.train.count, source.test.count
        if self.n_train < c.workers:
            raise UserError(f"cluster.workers: {c.workers} workers for only {self.n_train} training examples")
        self.train_bounds = data.shard_bounds(self.n_train, c.workers)
        self.test_bounds = data.shard_bounds(self.n_test, c.workers)
        self.starts = np.array([lo for lo, _ in self.train_bounds])
        self.timeout = c.step_timeout_s
        self.max_failures, self.failures = c.max_failures, 0  # budget (-1: unlimited) and spent
        self.source, self.dtype, self.worker_cls = source, job.model.dtype, worker_cls
        self.pg = placement_group([{"CPU": c.cpus_per_worker}] * c.workers, strategy=c.placement)
        if not self._wait(self.pg.ready(), 60):
            remove_placement_group(self.pg)
            raise ClusterError(f"cannot place {c.workers} workers of {c.cpus_per_worker} CPU each "
                               f"({c.placement}); cluster resources: {ray.cluster_resources()}")
        # The data set once per node, read zero-copy by the workers there, when every worker shares
        # one node (the fast transport reads any row) or the compiled transport is asked for;
        # otherwise each worker loads only its own shard and no node holds rows it does not use.
        bundle_nodes = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        self.bundle_nodes = [bundle_nodes[rank] for rank in range(c.workers)]
        shared = len(set(self.bundle_nodes)) == 1 or c.transport == "compiled"
        self.node_data = fastpath.put_per_node(source, self.bundle_nodes) if shared else {}
        self.actors = [self._start(rank, source, job.model.dtype) for rank in range(c.workers)]
        self.worker_info = ray.get([a.info.remote() for a in self.actors])
        self.fast = self._fast_transport(job)
        self.mesh = self._mesh_transport(job)

    def _mesh_transport(self, job):
        """MeshTransport for transport auto or mesh when every worker is on the driver's node."""
        t = job.cluster.transport
        if t not in ("auto", "mesh"):
            return None
        if mesh.eligible(self, ray.get_runtime_context().get_node_id()):
            return MeshTransport(self, job)
        if t == "mesh":
            self.close()
            raise ClusterError("cluster.transport = mesh needs every worker on the driver's node; "
                               f"the workers were placed on {len(set(self.bundle_nodes))} node(s) "
                               "(use transport auto, actors or compiled)")
        return None

    def run_steps(self, state, stop):
        """Steps state.step.. (up to stop) in one round over the workers' mesh, or None (see mesh)."""
        return self.mesh.run_steps(state, stop) if self.mesh is not None else None

    def _fast_transport(self, job):
        """fastpath.FastTransport when cluster.transport = compiled and the job allows it, else None."""
        if not (job.cluster.transport == "compiled" and self.node_data and fastpath.eligible(job)):
            return None
        here = ray.get_runtime_context().get_node_id()
        node = here if here in self.node_data else self.bundle_nodes[0]
        return fastpath.FastTransport(self, job, ray.get(self.node_data[node])[0])

    @staticmethod
    def _wait(ref, timeout):
        ready, _ = ray.wait([ref], timeout=timeout)
        return bool(ready)

    def _start(self, rank, source, dtype):
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        # max_restarts=0: the driver replaces a lost worker itself, so every loss is seen and counted
        return self.worker_cls.options(
            num_cpus=self.pg.bundle_specs[rank]["CPU"], scheduling_strategy=strategy,
            max_restarts=0, max_task_retries=0, runtime_env={"env_vars": BLAS_ENV},
            name=None,
        ).remote(rank, source, self.train_bounds[rank], self.test_bounds[rank], dtype,
                 node_data=[self.node_data[self.bundle_nodes[rank]]] if self.node_data else None)

    def nodes(self):
        return sorted({info["node_id"] for info in self.worker_info})

    def _split(self, batch):
        """{rank: local indices} for a batch of global indices (None: every worker, whole shard)."""
        if batch is None:
            return {rank: None for rank in range(self.workers)}
        owner = np.searchsorted(self.starts, batch, side="right") - 1
        return {rank: batch[owner == rank] - self.starts[rank]
                for rank in range(self.workers) if np.any(owner == rank)}

    def grad_sums(self, params, batch, step):
        if self.fast is not None and batch is not None:  # fast transport hook
            result = self.fast.grad_sums(params, batch, step)
            if result is not None:
                return result
        params_ref = ray.put(params)
        shares = self._split(batch)
        results = self._call({rank: ("grad_sums", (params_ref, idx, step)) for rank, idx in shares.items()},
                             f"step {step + 1}")
        total, loss_sum, count, compute_s, bad = None, 0.0, 0, 0.0, None
        for rank in sorted(results):
            tag, grads, part_loss, part_count, part_s = results[rank]
            if tag != step:
                raise RuntimeError(f"worker {rank} answered step {tag} during step {step}")
            if bad is None and not _finite(grads, part_loss):
                bad = f"{rank} (pid {self.worker_info[rank]['pid']})"
            total = {k: g.copy() for k, g in grads.items()} if total is None else optim.add_into(total, grads)
            loss_sum += part_loss
            count += part_count
            compute_s = max(compute_s, part_s)
        return trainer.StepResult(total, loss_sum, count, compute_s, bad)

    def evaluate(self, params):
        if self.fast is not None:  # fast transport hook
            result = self.fast.evaluate(params)
            if result is not None:
                return result
        params_ref = ray.put(params)
        results = self._call({rank: ("evaluate", (params_ref,)) for rank in range(self.workers)})
        correct = sum(r[0] for r in results.values())
        loss_sum = sum(results[rank][1] for rank in sorted(results))
        return correct, loss_sum, sum(r[2] for r in results.values())

    def _call(self, calls, during="evaluation"):
        """Run {rank: (method, args)} on the workers; when one dies or misses the step timeout,
        replace it and run the whole call again.

        Results are pure functions of (weights, indices), so running a step again after a
        failure gives the same bits, and nothing is applied until every worker has answered.
        """
        while True:
            values, failed = self._run_once(calls, self.timeout)
            if not failed:
                return values
            self._on_failure(failed, during)

    def _run_once(self, calls, timeout):
        """({rank: result}, {rank: what went wrong}) of one attempt at {rank: (method, args)}."""
        refs = {rank: getattr(self.actors[rank], m).remote(*args) for rank, (m, args) in calls.items()}
        _, pending = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout)
        failed = {rank: f"timed out (cluster.step_timeout_s = {self.timeout:g})"
                  for rank, ref in refs.items() if ref in pending}
        values = {}
        for rank in sorted(refs.keys() - failed.keys()):
            try:
                values[rank] = ray.get(refs[rank])  # ready: no waiting
            except LOST:
                failed[rank] = "died"
        return values, failed

    def _on_failure(self, failed, during):
        """Spend one failure per lost worker, then replace each by a new actor in its bundle."""
        for rank, what in sorted(failed.items()):
            self.failures += 1
            who = self._describe(rank)
            if 0 <= self.max_failures < self.failures:
                raise WorkerFailure(f"{who} {what} during {during}: failure {self.failures}, "
                                    f"cluster.max_failures is {self.max_failures}")
            left = "unlimited" if self.max_failures < 0 else self.max_failures - self.failures
            log.warning("%s %s during %s; restarting it and recomputing (%s failures left)",
                        who, what, during, left)
            ray.kill(self.actors[rank], no_restart=True)  # a hung process is killed, not waited for
            self.actors[rank] = self._start(rank, self.source, self.dtype)
        self._await_restarted(sorted(failed))

    def _await_restarted(self, ranks):
        """Wait until the replaced workers have loaded their shards, starting again any that died
        on the way (placed on a node not yet known dead); refresh their worker_info."""
        t0 = time.perf_counter()
        deadline = t0 + RESTART_TIMEOUT_S
        while ranks:
            refs = {rank: self.actors[rank].info.remote() for rank in ranks}
            _, pending = ray.wait(list(refs.values()), num_returns=len(refs),
                                  timeout=max(deadline - time.perf_counter(), 0))
            ranks = []
            for rank, ref in refs.items():
                if ref in pending:
                    raise WorkerFailure(f"worker {rank} could not be restarted within {RESTART_TIMEOUT_S} s; "
                                        f"cluster resources: {ray.available_resources()}")
                try:
                    self.worker_info[rank] = ray.get(ref)
                except LOST as e:
                    if getattr(e, "actor_init_failed", False) or time.perf_counter() > deadline:
                        raise WorkerFailure(f"worker {rank} could not be restarted: "
                                            f"{str(e).strip().splitlines()[0]}") from None
                    ranks.append(rank)
            if ranks:
                time.sleep(RESTART_PAUSE_S)
            for rank in ranks:
                self.actors[rank] = self._start(rank, self.source, self.dtype)
        log.warning("worker(s) restarted in %.1f s", time.perf_counter() - t0)

    def _describe(self, rank):
        info = self.worker_info[rank]
        return f"worker {rank} (pid {info['pid']} on node {info['node_id'][:8]})"

    def close(self):
        if self.fast is not None:  # fast transport hook
            self.fast.close()
        if getattr(self, "mesh", None) is not None:
            self.mesh.close()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)


class MeshTransport:
    """Rounds of steps over the workers' mesh (distmlp.mesh), for a RayBackend whose workers share the driver's node."""

    def __init__(self, backend, job):
        self.backend = backend
        o = job.optimizer
        self.sampler = (o.name, backend.n_train, o.batch_size, o.sampling_mode, job.run.seed)
        self.lr, self.momentum = o.learning_rate, o.momentum
        # 0700: only this user's workers; in memory (tmpfs) where there is one, so the kernel
        # never writes the shared slots back to a disk
        self.shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        self.dir = tempfile.mkdtemp(prefix="distmlp-mesh-", dir=self.shm)  # the workers remove it
        self.gen, self.failures, self.nonfinite_at = 0, 0, None

    def run_steps(self, state, stop):
        """[(loss sum, count, compute s, step s)] for steps state.step.. (at most to stop),
        with state.params and state.opt_state advanced; None when the caller should run one
        step itself (its sum is not finite, or the mesh keeps failing)."""
        first = state.step
        if self.failures >= mesh.MAX_MESH_FAILURES or self.nonfinite_at == first:
            return None
        b = self.backend
        start_ref = ray.put((state.params, state.opt_state))
        while True:
            request = {"gen": self.gen, "dir": self.dir, "workers": b.workers, "first": first, "stop": stop,
                       "sampler": self.sampler, "lr": self.lr, "momentum": self.momentum,
                       "timeout": b.timeout, "round_s": mesh.ROUND_S}
            t0 = time.perf_counter()
            calls = {rank: ("mesh_run", (start_ref, request)) for rank in range(b.workers)}
            # a healthy round can run two steps of up to the step timeout past mesh.ROUND_S: rank 0
            # decides to go on before its peers finish the step (which may take the timeout),
            # and the next step may take it too
            replies, failed = b._run_once(calls, mesh.ROUND_S + 2 * b.timeout + 5)
            if failed:
                steps = [r["step"] for r in replies.values() if r["status"] == mesh.BROKEN]
                during = f"step {min(steps) + 1}" if steps else f"steps {first + 1}-{stop}"
                b._on_failure(failed, during)
                self._next_generation()
                continue
            break
        wall = time.perf_counter() - t0
        statuses = {r["status"] for r in replies.values()}
        if mesh.BROKEN in statuses:  # no worker lost, yet the round broke (a socket problem): count it
            self.failures += 1
            self._next_generation()
            detail = next(r["detail"] for r in replies.values() if r["status"] == mesh.BROKEN)
            log.warning("worker mesh failed (%s); step %d goes over actor calls", detail, first + 1)
            return None
        done = {len(r["steps"]) for r in replies.values()}
        prints = {r["fingerprint"] for r in replies.values()}
        if len(done) != 1 or len(prints) != 1:
            raise RuntimeError(f"mesh workers disagree after step {first}: steps {done}, weights {len(prints)} kinds")
        n = done.pop()
        if mesh.NONFINITE in statuses:
            self.nonfinite_at = first + n
        if n == 0:
            return None
        state.params, state.opt_state = replies[0]["params"], replies[0]["opt_state"]
        overhead = max(wall - sum(rec[3] for rec in replies[0]["steps"]), 0.0) / n
        out = []
        for i in range(n):
            loss_sum, count, _, step_s = replies[0]["steps"][i]
            compute = max(r["steps"][i][2] for r in replies.values())
            out.append((loss_sum, count, compute, step_s + overhead))
        return out

    def _next_generation(self):
        """New sockets and slots (in a new directory) for the next attempt; the old ones go."""
        shutil.rmtree(self.dir, ignore_errors=True)  # left when set-up broke half-way
        self.gen += 1
        self.dir = tempfile.mkdtemp(prefix="distmlp-mesh-", dir=self.shm)

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def _finite(grads, loss):
    return np.isfinite(loss) and all(np.isfinite(g).all() for g in grads.values())


def _resume_hint(run_dir, latest):
    if latest is None:
        return "no checkpoint saved yet"
    return f"last good checkpoint {latest} (continue with: distmlp train --resume {run_dir})"


def default_run_dir(job):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{job.run.name}")


def run_job(job, resume=None, json_mode=False, echo=print, address=None):
    """Train job on Ray (embedded, or the cluster at cluster.address); returns the summary dict.

    resume: a run directory; training continues from its newest valid checkpoint with the
    job saved there. Nothing is written until the data set resolved and the workers started.
    """
    from distmlp import checkpoint, config, metrics

    t0 = time.perf_counter()
    state = None
    if resume is not None:
        path, ckpt = checkpoint.latest_valid(resume)
        job, state = ckpt.job, checkpoint.to_train_state(ckpt)
        if address is not None:
            job = config.replace(job, cluster={"address": address})
        run_dir = str(resume)
        echo(f"resuming {run_dir} from {path} (step {state.step})")
    else:
        run_dir = job.run.run_dir or default_run_dir(job)
        if os.path.exists(run_dir) and os.listdir(run_dir):
            raise UserError(f"{run_dir}: run directory exists and is not empty (use --resume {run_dir})")
    source = data.resolve(job.data.dataset, job.data.path)
    sampler = trainer.make_sampler(job, source.train.count)  # refuses a batch larger than the data set
    if resume is not None:
        checkpoint.check_sampler(ckpt, sampler)  # the data set must still give the same batches
    if job.optimizer.name == "sgd" and job.cluster.workers > 1:
        echo("note: sgd updates after every example, so more workers add no speed (only shards the data)")
    started = connect(job.cluster.address)
    backend = None
    try:
        backend = RayBackend(source, job)
        nodes = len(backend.nodes())
        echo(f"{job.cluster.workers} workers on {nodes} node(s) | {job.optimizer.name} "
             f"lr {job.optimizer.learning_rate} | {source.name}: {backend.n_train} train, {backend.n_test} held out")
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "job.toml"), "w") as f:
            f.write(config.to_toml(job))
        ckpt_hook = checkpoint.CheckpointHook(run_dir, job, job.run.checkpoint_every, job.run.keep_last)
        hooks = metrics.run_hooks(job, run_dir, ckpt_hook, quiet=json_mode, echo=echo)
        try:
            state = trainer.train(job, backend, state, hooks)
        except (WorkerFailure, trainer.DivergenceError) as e:
            raise type(e)(f"{e}; {_resume_hint(run_dir, checkpoint.pointer(run_dir))}") from None
    finally:
        if backend is not None:
            backend.close()
        if started:
            ray.shutdown()
    m = state.metrics
    return {"run_dir": run_dir, "checkpoint": ckpt_hook.last_path, "workers": job.cluster.workers,
            "optimizer": job.optimizer.name, "steps": state.step, "epochs": m.get("epoch"),
            "train_loss": m.get("train_loss"), "test_loss": m.get("test_loss"),
            "test_accuracy": m.get("test_accuracy"), "wall_s": time.perf_counter() - t0,
            "examples_per_s": metrics.examples_per_s(hooks), "best_checkpoint": checkpoint.pointer(run_dir, "best"),
            "dataset": job.data.dataset, "data_path": job.data.path}
