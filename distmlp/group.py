"""The worker group: places the worker actors, starts them, replaces the ones lost, counts failures.

Transports drive the workers only through `call` (one method on every worker named, with
failed workers replaced and the call made again), `call_once` (one attempt, the failures
returned) and `replace` (spend the failure budget and start new actors in the lost workers'
places).
"""

import json
import logging
import time

import ray
from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distmlp import data, worker
from distmlp.connect import ClusterError
from distmlp.errors import RunStopped, UserError

log = logging.getLogger("distmlp")

# A worker is lost when its process (or its node) died, or its result went with its node.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
PLACE_TIMEOUT_S = 60  # the workers must be placed by then
PLACE_CHECK_S = 2.0  # placed by then, or the cluster is checked for room
RESTART_PAUSE_S = 1.0  # before starting again a replacement that died while starting


class WorkerFailure(RunStopped, RuntimeError):
    """Workers failed more often than cluster.max_failures allows, or one could not be restarted."""


class Unreplaceable(WorkerFailure):
    """Lost workers could not be replaced within cluster.replace_timeout_s (no room for them)."""

    def __init__(self, message, ranks):
        super().__init__(message)
        self.ranks = ranks  # the ranks of the workers that are gone


def _await_placement(pg, c, timeout_s):
    """Wait for the workers' placement group; fail in seconds when the cluster's nodes can never
    hold it and no autoscaler can add nodes, and say what it waits for when one can."""
    deadline = time.monotonic() + timeout_s
    what = f"cannot place {c.workers} workers of {c.cpus_per_worker:g} CPU each ({c.placement})"
    ready, _ = ray.wait([pg.ready()], timeout=min(PLACE_CHECK_S, timeout_s))
    if ready:
        return
    short = shortfall(c, [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]])
    if short and not autoscaler_can_add_nodes():
        remove_placement_group(pg)
        raise ClusterError(f"{what}: {short}, and no autoscaler can add nodes to this cluster")
    if short:
        log.warning("%s on the nodes there are now (%s): waiting up to %g s for the autoscaler to add nodes",
                    what, short, timeout_s)
    ready, _ = ray.wait([pg.ready()], timeout=max(deadline - time.monotonic(), 0))
    if not ready:
        remove_placement_group(pg)
        raise ClusterError(f"{what} within {timeout_s:g} s; cluster resources: {ray.cluster_resources()}")


def shortfall(c, node_cpus):
    """Why cluster settings c can never be placed on nodes with node_cpus CPUs, or None if they
    can (when the nodes are free)."""
    per, eps = c.cpus_per_worker, 1e-9
    if c.placement == "STRICT_PACK":
        fits = any(cpus + eps >= c.workers * per for cpus in node_cpus)
    elif c.placement == "STRICT_SPREAD":
        fits = sum(cpus + eps >= per for cpus in node_cpus) >= c.workers
    else:
        fits = sum(int((cpus + eps) // per) for cpus in node_cpus) >= c.workers
    if fits:
        return None
    listed = ", ".join(f"{cpus:g}" for cpus in node_cpus)
    return f"the cluster's {len(node_cpus)} node(s) have {listed} CPU ({sum(node_cpus):g} in all)"


def autoscaler_can_add_nodes():
    """Whether an autoscaler that can launch nodes runs for this cluster.

    Ray has no public API for this. Every head runs Ray's monitor, which writes its report to
    the internal key-value store (private: ray.experimental.internal_kv); a head started without
    an autoscaling config runs it with a read-only provider, whose node types are the existing
    nodes, named "node_<node id>". Autoscaler v2 writes no such report: assume it can."""
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    if is_autoscaler_v2():
        return True
    report = _internal_kv_get("__autoscaling_status")
    if not report:
        return False
    try:
        types = json.loads(report).get("autoscaler_report", {}).get("node_type_mapping") or {}
    except (ValueError, AttributeError):
        return False
    return any(not name.startswith("node_") for name in types.values())


class WorkerGroup:
    """cluster.workers ShardWorker actors, one shard each, placed by one placement group."""

    def __init__(self, source, job, worker_cls=worker.RemoteShardWorker, place_timeout_s=PLACE_TIMEOUT_S):
        c = job.cluster
        self.workers = c.workers
        self.n_train, self.n_test = source.train.count, source.test.count
        if self.n_train < c.workers:
            raise UserError(f"cluster.workers: {c.workers} workers for only {self.n_train} training examples")
        self.bounds = data.shard_bounds(self.n_train, c.workers)  # training rows per rank
        self.test_bounds = data.shard_bounds(self.n_test, c.workers)
        self.timeout, self.replace_timeout = c.step_timeout_s, c.replace_timeout_s
        self.max_failures, self.failures = c.max_failures, 0  # budget (-1: unlimited) and spent
        self.source, self.dtype, self.kernel, self.worker_cls = source, job.model.dtype, job.model.kernel, worker_cls
        self.pg = placement_group([{"CPU": c.cpus_per_worker}] * c.workers, strategy=c.placement)
        _await_placement(self.pg, c, place_timeout_s)
        bundle_nodes = placement_group_table(self.pg)["bundles_to_node_id"]
        self.bundle_nodes = [bundle_nodes[rank] for rank in range(c.workers)]
        # The data set once per node, read zero-copy by the workers there, when every worker shares
        # one node; across nodes each worker loads only its own shard.
        one_node = len(set(self.bundle_nodes)) == 1
        self.node_data = worker.put_per_node(source, self.bundle_nodes) if one_node else {}
        self.actors = [self._start(rank) for rank in range(c.workers)]
        self.worker_info = ray.get([a.info.remote() for a in self.actors])

    def _start(self, rank):
        strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        node_data = [self.node_data[self.bundle_nodes[rank]]] if self.node_data else None
        # max_restarts=0: the group replaces a lost worker itself, so every loss is seen and counted
        return self.worker_cls.options(
            num_cpus=self.pg.bundle_specs[rank]["CPU"], scheduling_strategy=strategy,
            max_restarts=0, max_task_retries=0, runtime_env={"env_vars": worker.BLAS_ENV},
        ).remote(rank, self.source, self.bounds[rank], self.test_bounds[rank], self.dtype,
                         node_data=node_data, kernel=self.kernel)

    def nodes(self):
        return sorted({info["node_id"] for info in self.worker_info})

    def call_once(self, calls, timeout):
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

    def call(self, calls, during):
        """{rank: result} of {rank: (method, args)}; when a worker dies or misses the step timeout
        it is replaced and the whole call made again.

        Results are pure functions of (weights, indices), so a call made again after a failure
        gives the same bits, and nothing is applied until every worker has answered.
        """
        while True:
            values, failed = self.call_once(calls, self.timeout)
            if not failed:
                return values
            self.replace(failed, during)

    def replace(self, failed, during):
        """Spend one failure per lost worker {rank: what went wrong}, then start a new actor in
        each one's place and wait until it has loaded its shard."""
        for rank, what in sorted(failed.items()):
            self.failures += 1
            who = self.describe(rank)
            if 0 <= self.max_failures < self.failures:
                raise WorkerFailure(f"{who} {what} during {during}: failure {self.failures}, "
                                    f"cluster.max_failures is {self.max_failures}")
            left = "unlimited" if self.max_failures < 0 else self.max_failures - self.failures
            log.warning("%s %s during %s; restarting it and recomputing (%s failures left)",
                        who, what, during, left)
            ray.kill(self.actors[rank], no_restart=True)  # a hung process is killed, not waited for
            self.actors[rank] = self._start(rank)
        self._await_restarted(sorted(failed))

    def _await_restarted(self, ranks):
        """Wait until the replaced workers have loaded their shards, starting again any that died
        on the way (placed on a node not yet known dead); refresh their worker_info."""
        t0 = time.perf_counter()
        deadline = t0 + self.replace_timeout
        while ranks:
            refs = {rank: self.actors[rank].info.remote() for rank in ranks}
            _, pending = ray.wait(list(refs.values()), num_returns=len(refs),
                                  timeout=max(deadline - time.perf_counter(), 0))
            if pending:
                lost = sorted(rank for rank, ref in refs.items() if ref in pending)
                for rank in lost:
                    ray.kill(self.actors[rank], no_restart=True)
                free = ray.available_resources().get("CPU", 0.0)
                raise Unreplaceable(f"worker(s) {', '.join(map(str, lost))} could not be restarted within "
                                    f"cluster.replace_timeout_s = {self.replace_timeout:g} s ({free:g} CPU free)", lost)
            ranks = []
            for rank, ref in refs.items():
                try:
                    self.worker_info[rank] = ray.get(ref)
                except LOST as e:
                    why = str(e).strip().splitlines()[0]
                    if getattr(e, "actor_init_failed", False):
                        raise WorkerFailure(f"worker {rank} could not be restarted: {why}") from None
                    if time.perf_counter() > deadline:
                        raise Unreplaceable(f"worker {rank} could not be restarted within cluster.replace_timeout_s"
                                            f" = {self.replace_timeout:g} s: {why}", [rank]) from None
                    ranks.append(rank)
            if ranks:
                time.sleep(RESTART_PAUSE_S)
            for rank in ranks:
                self.actors[rank] = self._start(rank)
        log.warning("worker(s) restarted in %.1f s", time.perf_counter() - t0)

    def describe(self, rank):
        """"worker 1 (pid 1234 on node 0a1b2c3d)"."""
        info = self.worker_info[rank]
        return f"worker {rank} (pid {info['pid']} on node {info['node_id'][:8]})"

    def close(self):
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        remove_placement_group(self.pg)
