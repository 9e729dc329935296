"""The one-node mesh transport (workers sum each other's gradients through shared memory).

Reference: the plain actor transport, where the driver sums the workers' gradient sums and
updates. The mesh must give the same bits (weights, losses, evaluations) for every optimizer,
worker count, momentum, dtype and way of cutting the run into rounds, and recover from a
worker lost in the middle of a round with the same bits.
"""

import logging
import os
import re
import signal
import sys
import threading
import time

import numpy as np
import pytest
import ray

from distmlp import config, connect, data, mesh, mlp, optim, step, trainer, transport
from distmlp.worker import ShardWorker
from hooks import AtStep

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker processes cannot import tests/


def params_for(seed, dtype=np.float32, sizes=(784, 16, 16, 10)):
    return mlp.init_params(sizes, np.random.default_rng(seed), dtype)


def bits_equal(a, b):
    return a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


# ----------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_flat_update_is_optim_step_bit_for_bit(dtype, momentum):
    rng = np.random.default_rng(1)
    params = params_for(2, dtype, (20, 7, 5, 3))
    state = optim.init_state(params, momentum)
    if momentum:
        state = {k: rng.normal(size=v.shape).astype(dtype) for k, v in state.items()}
    weights = step.FlatWeights(params, state, momentum)
    for count in (7, 1, 32):
        grads = {k: rng.normal(size=v.shape).astype(dtype) * 10 for k, v in params.items()}
        step.flatten(grads, mlp.param_names(3), out=weights.total)
        assert weights.apply(0.05, count)
        params, state = optim.step(params, optim.mean_grads(grads, count), state, 0.05, momentum)
        got_params, got_state = weights.state()
        assert bits_equal(got_params, params) and bits_equal(got_state, state)
        assert bits_equal(weights.current(), params)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 3e38])
def test_flat_update_refuses_a_non_finite_update_and_changes_nothing(bad):
    params = params_for(3, np.float32, (6, 4, 3))
    weights = step.FlatWeights(params, {}, 0.0)
    weights.total[:] = 1.0
    weights.total[5] = bad  # 3e38 / 1 * lr 1e3: overflows float32
    assert not weights.apply(1e3, 1)
    assert bits_equal(weights.state()[0], params)


def test_layout_round_trips_every_array():
    params = params_for(4, np.float64, (9, 5, 4, 2))
    weights = step.FlatWeights(params, {}, 0.0)
    flat = step.flatten(params, mlp.param_names(3))
    assert flat.size == sum(p.size for p in params.values()) == weights.params[0].size
    assert bits_equal(weights.current(), params) and flat.tobytes() == weights.params[0].tobytes()


def connect_all(directory, n, items=10, timeout=5.0, gen=0):
    """n Peers made in threads (each blocks until the others connect); {rank: Peers}."""
    out, errors = {}, []
    os.makedirs(directory, mode=0o700, exist_ok=True)

    def make(rank):
        try:
            out[rank] = mesh.Peers(str(directory), gen, rank, n, items, np.float32, timeout)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=make, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    return out


def exchange_all(peers, step, headers):
    out, errors = {}, []

    def go(rank):
        try:
            out[rank] = peers[rank].exchange(step, headers[rank])
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=go, args=(r,)) for r in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out, errors


def test_peers_share_headers_and_slots_and_leave_no_files(tmp_path):
    peers = connect_all(tmp_path / "mesh", 3)
    assert os.listdir(tmp_path / "mesh") == []  # sockets and slot files gone once all are mapped
    for rank, p in peers.items():
        p.mine[1] = rank + 0.5
    got, errors = exchange_all(peers, 5, {r: (r * 1.5, r + 1, int(r == 0)) for r in peers})
    assert not errors
    for rank in peers:
        assert got[rank] == {r: (5, r * 1.5, r + 1, int(r == 0)) for r in peers}
        for other in peers:
            assert np.all(peers[rank].slots[other][1] == other + 0.5)
    for p in peers.values():
        p.close()


def test_a_peer_that_closes_or_goes_silent_breaks_the_step(tmp_path):
    peers = connect_all(tmp_path / "a", 3, timeout=1.0)
    peers[2].close()  # as a killed process's sockets close
    t0 = time.perf_counter()
    _, errors = exchange_all({r: peers[r] for r in (0, 1)}, 0, {0: (0.0, 1, 0), 1: (0.0, 1, 0)})
    assert len(errors) == 2 and all(isinstance(e, mesh.MeshBroken) for e in errors)
    assert all("worker 2 closed its connection during step 1" in str(e) for e in errors), errors
    assert time.perf_counter() - t0 < 1.0  # end of file, not the timeout
    for p in peers.values():
        p.close()

    peers = connect_all(tmp_path / "b", 2, timeout=0.5, gen=1)
    with pytest.raises(mesh.MeshBroken, match="worker 1 did not answer within cluster.step_timeout_s during step 4"):
        peers[0].exchange(3, (0.0, 1, 0))  # rank 1 never sends
    for p in peers.values():
        p.close()


# ----------------------------------------------------------------------------- with Ray


@pytest.fixture(scope="module")
def source():
    return data.resolve("mnist-sample")


def job_for(name, transport, steps, workers=2, **extra):
    job = config.load_job(None, [f'optimizer.name="{name}"', "optimizer.lr=0.1", "run.seed=13",
                                 f"run.steps={steps}", "run.eval_every=7", f"cluster.workers={workers}",
                                 "cluster.cpus_per_worker=0.5", f'cluster.transport="{transport}"'])
    return config.replace(job, **extra) if extra else job


class Rounds(trainer.Hook):
    """Hook: the records of a run, plus how many rounds the mesh ran (calls to run_steps)."""

    def __init__(self, backend):
        self.records, self.rounds = [], 0
        if isinstance(backend, transport.MeshTransport):
            inner = backend.run_steps

            def counted(state, stop, plan):
                self.rounds += 1
                return inner(state, stop, plan)
            backend.run_steps = counted

    def on_step(self, state, record):
        self.records.append(record)


def run(job, source, hooks=(), worker_cls=None):
    """(final state, backend, Rounds) of job on a RayBackend."""
    backend = transport.start(source, job, **({"worker_cls": worker_cls} if worker_cls else {}))
    rounds = Rounds(backend)
    try:
        return trainer.train(job, backend, hooks=[rounds, *(h(backend) for h in hooks)]), backend, rounds
    finally:
        backend.close()


CASES = {
    "minibatch-2": ("minibatch", 30, 2, {}),
    "minibatch-3-uneven": ("minibatch", 20, 3, {}),
    "minibatch-1": ("minibatch", 20, 1, {}),
    "sgd-2": ("sgd", 40, 2, {}),
    "gd-2": ("gd", 4, 2, {}),
    "gd-3-uneven": ("gd", 3, 3, {}),  # 2,667 rows a worker: its last chunk short
    "momentum-2": ("minibatch", 20, 2, {"optimizer": {"momentum": 0.9}}),
    "float64-2": ("minibatch", 15, 2, {"model": {"dtype": "float64"}}),
    "sample-2": ("minibatch", 15, 2, {"optimizer": {"sampling": "sample"}}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mesh_equals_actor_calls_bit_for_bit(ray_session, source, case, monkeypatch):
    name, steps, workers, extra = CASES[case]
    job = job_for(name, "auto", steps, workers, **extra)
    monkeypatch.setattr(trainer, "ROUND_S", 60.0)  # rounds end only where the loop needs the weights
    got, backend, rounds = run(job, source)
    want, reference, actor_rounds = run(config.replace(job, cluster={"transport": "actors"}), source)
    assert isinstance(backend, transport.MeshTransport) and not isinstance(reference, transport.MeshTransport)
    assert got.step == want.step == steps and got.samples_seen == want.samples_seen
    assert bits_equal(got.params, want.params) and bits_equal(got.opt_state, want.opt_state)
    for key in ("train_loss", "test_loss", "test_accuracy", "samples_seen", "epoch"):
        assert got.metrics[key] == want.metrics[key], key
    def evaluations(records):
        return [(r["step"], r["test_loss"], r["test_accuracy"]) for r in records if "test_loss" in r]
    assert [at for at, _, _ in evaluations(rounds.records)] == [*range(7, steps, 7), steps]  # every 7, the end
    assert evaluations(rounds.records) == evaluations(actor_rounds.records)
    assert rounds.rounds == 1  # the workers evaluate inside the round: no round ends at an evaluation
    assert all(0 <= r["compute_s"] <= r["step_s"] and r["comm_s"] >= 0 for r in rounds.records)


def test_rounds_cut_at_every_step_give_the_same_bits(ray_session, source, monkeypatch):
    """ROUND_S = 0: rank 0 ends every round after one step (the time-based end agreed in the header)."""
    job = job_for("minibatch", "mesh", 12)
    want, _, _ = run(job, source)
    monkeypatch.setattr(trainer, "ROUND_S", 0.0)
    got, _, rounds = run(job, source)
    assert rounds.rounds == 12
    assert bits_equal(got.params, want.params) and got.metrics["test_loss"] == want.metrics["test_loss"]


def test_hook_and_checkpoint_steps_end_rounds(ray_session, source, tmp_path):
    from distmlp import checkpoint
    job = job_for("minibatch", "auto", 20, run={"eval_every": 0, "steps": 20})
    seen = []
    hook = AtStep(6, lambda backend: seen.append(os.listdir(backend.dir)))
    ckpt = checkpoint.CheckpointHook(tmp_path, job, every=8, keep_last=5)
    backend = transport.start(source, job)
    rounds = Rounds(backend)
    try:
        state = trainer.train(job, backend, hooks=[rounds, hook(backend), ckpt])
    finally:
        backend.close()
    assert rounds.rounds == 4  # [0, 6), [6, 8), [8, 16), [16, 20)
    assert seen == [[]]  # nothing named in the (private) mesh directory while the run goes
    assert not os.path.exists(backend.dir)  # and the directory is gone after close
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-000008", "step-000016", "step-000020"]
    reference, _, _ = run(config.replace(job, cluster={"transport": "actors"}), source)
    assert bits_equal(state.params, reference.params)
    at8 = checkpoint.load(tmp_path / "checkpoints" / "step-000008")
    eight, _, _ = run(config.replace(job, run={"steps": 8}, cluster={"transport": "actors"}), source)
    assert at8.step == 8 and at8.samples_seen == 8 * 32 and bits_equal(at8.params, eight.params)


def test_a_worker_killed_in_the_middle_of_a_round_is_replaced_and_the_round_rerun(ray_session, source, caplog):
    """SIGKILL from a timer while a long round runs: its peer sees end of file, the driver
    restarts the worker and runs the round again from its first step; same bits."""
    job = job_for("minibatch", "auto", 1500, run={"eval_every": 0, "steps": 1500})
    want, _, _ = run(job, source)
    killed = []

    def kill_soon(backend):
        pid = backend.group.worker_info[1]["pid"]
        threading.Timer(0.15, lambda: (os.kill(pid, signal.SIGKILL), killed.append(pid))).start()

    class KillAtStart(trainer.Hook):
        def __init__(self, backend):
            self.backend = backend

        def on_start(self, state, info):
            kill_soon(self.backend)

    with caplog.at_level(logging.WARNING, logger="distmlp"):
        got, backend, rounds = run(job, source, [KillAtStart])
    assert len(killed) == 1 and backend.group.failures == 1 and backend.group.worker_info[1]["pid"] != killed[0]
    warnings = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
    assert len(warnings) == 1 and re.search(rf"worker 1 \(pid {killed[0]} .*died during step \d+", warnings[0])
    assert bits_equal(got.params, want.params) and got.step == 1500


class SlowChunks(ShardWorker):
    """A full batch's chunks of rows (kernel.chunk_sums) take `delay_s` longer in rank `rank`, from
    its `after`-th chunk on; at its `kill_at`-th chunk rank's process kills itself, once (the first
    to do so leaves the file `marker`)."""

    plan = {}  # rank -> (delay_s, after, kill_at or None, marker); set before the workers start

    def __init__(self, rank, *args, **kwargs):
        super().__init__(rank, *args, **kwargs)
        delay_s, after, kill_at, marker = self.plan.get(rank, (0.0, 0, None, None))
        inner, calls = self.kernel.chunk_sums, [0]

        def chunk_sums(params, x_uint8, labels):
            calls[0] += 1
            if calls[0] == kill_at and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            if calls[0] > after:
                time.sleep(delay_s)
            return inner(params, x_uint8, labels)
        self.kernel.chunk_sums = chunk_sums


def slow_chunks(plan):
    return ray.remote(type("Planned", (SlowChunks,), {"plan": plan}))


def taken_by_rank(monkeypatch):
    """{rank: the peers' chunks it computed}, summed over the rounds the driver gets."""
    taken = {}
    inner = transport.round_of

    def counting(g, replies, wall, first):
        for rank, reply in replies.items():
            taken[rank] = taken.get(rank, 0) + reply["chunks_taken"]
        return inner(g, replies, wall, first)
    monkeypatch.setattr(transport, "round_of", counting)
    return taken


def test_a_slow_workers_chunks_are_computed_by_its_peer_with_the_same_bits(ray_session, source, monkeypatch):
    """gd: rank 1's chunks take 30 ms longer each, so rank 0, done with its own, takes rank 1's
    from the back of its queue; the sums are added in chunk order all the same."""
    job = job_for("gd", "auto", 3)
    want, _, _ = run(config.replace(job, cluster={"transport": "actors"}), source)
    taken = taken_by_rank(monkeypatch)
    got, backend, _ = run(job, source, worker_cls=slow_chunks({1: (0.03, 0, None, None)}))
    assert isinstance(backend, transport.MeshTransport)
    assert taken[0] >= 3 and taken[1] <= 3 * 2, taken  # rank 1 may take one of rank 0's as it ends
    assert bits_equal(got.params, want.params) and got.metrics["train_loss"] == want.metrics["train_loss"]


def test_minibatch_steps_share_no_chunks(ray_session, source, monkeypatch):
    taken = taken_by_rank(monkeypatch)
    run(job_for("minibatch", "auto", 5), source)
    assert taken == {0: 0, 1: 0}


def test_a_worker_killed_while_it_computes_a_peers_chunk_is_replaced_and_the_round_rerun(ray_session, source, caplog,
                                                                                         monkeypatch, tmp_path):
    """Rank 0's chunks are slow; rank 1, done with its 8, takes one of rank 0's and dies while
    computing it. Rank 0, waiting for that chunk's sums, sees rank 1's socket close (not the step
    timeout); the driver restarts rank 1 and reruns the round: the same bits."""
    job = config.replace(job_for("gd", "auto", 2), cluster={"step_timeout_s": 120.0})
    want, _, _ = run(config.replace(job, cluster={"transport": "actors"}), source)
    taken = taken_by_rank(monkeypatch)
    marker = str(tmp_path / "killed")
    worker_cls = slow_chunks({0: (0.05, 0, None, None), 1: (0.0, 0, 9, marker)})  # rank 1's 9th chunk is rank 0's
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="distmlp"):
        got, backend, _ = run(job, source, worker_cls=worker_cls)
    assert time.perf_counter() - t0 < 60  # end of file, not the 120 s step timeout
    assert backend.group.failures == 1
    assert any(re.search(r"worker 1 \(pid \d+ .*died during step 1", r.getMessage()) for r in caplog.records)
    assert os.path.exists(marker) and bits_equal(got.params, want.params) and taken[1] > 0


def test_nonfinite_steps_go_to_the_loop_with_the_same_outcome_as_actor_calls(ray_session, source):
    """lr 1e6 with on_nonfinite = skip: the same updates skipped, the same step and worker named."""
    outcomes = []
    for kind in ("mesh", "actors"):
        job = config.replace(job_for("minibatch", kind, 12), optimizer={"lr": 1e6},
                             run={"on_nonfinite": "skip", "seed": 11})
        with pytest.raises(trainer.DivergenceError) as info:
            run(job, source)
        outcomes.append(re.sub(r"pid \d+", "pid _", str(info.value)))
    assert outcomes[0] == outcomes[1] and "in worker" in outcomes[0]


def test_transport_mesh_needs_the_workers_on_the_drivers_node(ray_session, source, monkeypatch):
    monkeypatch.setattr(mesh, "eligible", lambda group, here: False)
    with pytest.raises(connect.ClusterError, match=r"cluster.transport = mesh needs every worker on the driver's node"):
        transport.start(source, job_for("minibatch", "mesh", 2))
    backend = transport.start(source, job_for("minibatch", "auto", 2))  # auto: actor calls then
    try:
        assert isinstance(backend, transport.ActorTransport)
    finally:
        backend.close()


# ------------------------------------------------------- shared memory another local user can reach


def test_a_mesh_directory_that_is_not_private_is_refused(tmp_path):
    """A symlink, a group- or world-readable directory, or another user's directory: no file made."""
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(victim)
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    (tmp_path / "theirs").mkdir(mode=0o700)
    os.chown(tmp_path / "theirs", 65534, 65534) if os.getuid() == 0 else None
    cases = ["link", "open"] + (["theirs"] if os.getuid() == 0 else [])
    for name in cases:
        with pytest.raises(PermissionError, match="not a private directory of this user"):
            mesh.Peers(str(tmp_path / name), 0, 0, 1, 10, np.float32, 1.0)
    assert os.listdir(victim) == [] and os.listdir(tmp_path / "open") == []


def test_a_symlink_planted_at_a_slot_path_is_not_followed(tmp_path):
    """Another user who could create files in the directory cannot make a worker truncate a victim file."""
    directory = tmp_path / "mesh"
    directory.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (directory / "g0-r0.buf").symlink_to(victim)
    with pytest.raises(FileExistsError):
        mesh.Peers(str(directory), 0, 0, 1, 10, np.float32, 1.0)
    assert victim.read_text() == "precious"


def test_slot_files_are_made_new_with_mode_0600(tmp_path):
    slot = mesh._map(str(tmp_path / "s.buf"), np.float32, (2, 8), create=True)
    assert slot.shape == (2, 8) and (os.stat(tmp_path / "s.buf").st_mode & 0o777) == 0o600


def test_a_peer_claiming_a_bad_rank_or_another_users_connection_is_refused(tmp_path, monkeypatch):
    import socket as socketlib
    import struct
    directory = tmp_path / "mesh"
    directory.mkdir(mode=0o700)
    for claimed in (7, 0):  # out of range; rank 0's own rank
        errors = []

        def listen():
            try:
                mesh.Peers(str(directory), claimed, 0, 2, 10, np.float32, 5.0)
            except Exception as e:  # reported below
                errors.append(e)
        t = threading.Thread(target=listen)
        t.start()
        sock = mesh._connect(str(directory / f"g{claimed}-r0.sock"), time.monotonic() + 5)
        sock.sendall(struct.pack("<q", claimed))
        t.join(10)
        sock.close()
        assert len(errors) == 1 and isinstance(errors[0], mesh.MeshBroken), errors
        assert f"claimed rank {claimed}, not one of the unseen ranks above 0" in str(errors[0])
    a, b = socketlib.socketpair(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    mesh._check_peer(a, 1)  # this user: accepted
    monkeypatch.setattr(mesh.os, "getuid", lambda: 4242)
    with pytest.raises(mesh.MeshBroken, match=r"worker 1 connected as user \d+, not this user"):
        mesh._check_peer(b, 1)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_a_worker_steps_on_a_core_of_its_own_only_when_the_workers_fill_the_cores():
    """Pinned to its rank's core for the round and let go after it (also when the round
    raises), in its own thread only; never with fewer (or more) workers than cores."""
    seen = {}

    def round_in_a_thread(rank, workers, fail=False):
        def body():
            before = os.sched_getaffinity(0)
            try:
                with mesh.core_of_its_own(rank, workers):
                    seen["inside"] = os.sched_getaffinity(0)
                    seen["process"] = os.sched_getaffinity(os.getpid())  # the main thread: untouched
                    if fail:
                        raise RuntimeError("a round that breaks")
            except RuntimeError:
                pass
            seen["after"], seen["before"] = os.sched_getaffinity(0), before
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        return seen

    cores = sorted(os.sched_getaffinity(0))
    for rank in range(len(cores)):
        for fail in (False, True):
            s = round_in_a_thread(rank, len(cores), fail)
            assert s["inside"] == {cores[rank]} and s["after"] == s["before"] == set(cores), (rank, fail)
            assert s["process"] == set(cores)
    for workers in {len(cores) - 1, len(cores) + 1} - {0}:
        s = round_in_a_thread(0, workers)
        assert s["inside"] == s["after"] == set(cores), workers


def test_stale_mesh_directories_of_dead_drivers_are_swept():
    dead = mesh.tempfile.mkdtemp(prefix=f"{mesh.PREFIX}{2**22 + 17}-", dir=mesh.shm_dir())
    live = mesh.make_dir()
    try:
        mesh.sweep_stale()
        assert not os.path.exists(dead) and os.path.isdir(live)
    finally:
        os.rmdir(live)


def test_too_little_shared_memory_means_actor_calls_with_a_warning(ray_session, source, monkeypatch, caplog):
    monkeypatch.setattr(mesh, "room_for", lambda workers, n_items, itemsize, chunks=0: False)
    with caplog.at_level(logging.WARNING, logger="distmlp"):
        backend = transport.start(source, job_for("minibatch", "auto", 2))
    try:
        assert isinstance(backend, transport.ActorTransport)
        assert any("too little free space" in r.getMessage() for r in caplog.records)
    finally:
        backend.close()
