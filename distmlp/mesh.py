"""The one-node transport: workers sum each other's gradients through shared memory, many steps per call.

On one node the driver does not need to be on the critical path of a step at all. Each worker
holds the weights (and momentum), draws the step's global batch from the same counter-based
sampler as the driver, computes the gradient sums of its own examples (ShardWorker.grad_sums,
as over actor calls), writes them into its slot of a shared-memory file, and tells every other
worker over a Unix socket (24 bytes: step, loss sum, count). Then every worker adds the slots
in rank order, divides by the total count and applies the update: the same arithmetic, in the
same order, as the driver of the actor transport, so the weights are the same bits in every
worker and equal to the actor transport's.

The driver (transport.MeshTransport) asks for a round of steps at a time (one actor call per
worker) and gets back each step's loss, count and timings, and the weights at the end. A round ends at the next point where
the training loop needs the weights (evaluation, checkpoint, a hook's step, the end), after
ROUND_S seconds, or at a step whose sum or update is not finite. Rank 0 decides the time-based end and
tells the others in the header of the step, so every worker stops after the same step. A step
that is not finite ends the round without being applied; every worker sees the same bits, so
all stop there, and the training loop applies its divergence policy.

Failure: a worker that dies closes its sockets, so its peers see end-of-file at once; a hung
worker makes them time out after cluster.step_timeout_s. Either way the round is abandoned,
the driver replaces the lost worker (WorkerGroup.replace: counted, restarted), opens a new
generation of sockets and runs the round again from the weights it started with: the same bits.

Per step only 24 bytes per peer cross a socket; the gradient sums (4 bytes per parameter) are
read straight from the peer's shared-memory slot (double-buffered by step parity: a worker can
only reach step s+1 once every peer has finished reading step s-1's slots).
"""

import contextlib
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import time

import numpy as np

from distmlp.fsutil import check_private_dir
from distmlp.rounds import RoundWorker

SPIN_S = 0.0005  # polling before sleeping, per receive (0.3-1 ms measured alike)
MAX_MESH_FAILURES = 10  # abandoned rounds with no worker lost; after that: actor calls
_HEADER = struct.Struct("<qdqq")  # step, loss sum, count, rank 0: last step of the round (1) or not (0)


class MeshBroken(Exception):
    """A peer closed its socket or did not answer within the step timeout."""

    def __init__(self, step, rank, why):
        super().__init__(f"worker {rank} {why} " + (f"during step {step + 1}" if step >= 0 else "while connecting"))
        self.step, self.rank, self.why = step, rank, why


# ---------------------------------------------------------------------------- worker side


class Peers:
    """This worker's Unix sockets to every other worker and the shared-memory slots, one generation."""

    def __init__(self, directory, gen, rank, n_workers, slot_items, dtype, timeout):
        self.gen, self.rank, self.n = gen, rank, n_workers
        self.timeout = timeout
        # wait for peers by polling (a sleeping worker wakes up tens of microseconds late)
        # only when every worker can have a core of its own
        self.spin_s = SPIN_S if n_workers <= (os.cpu_count() or 1) else 0.0
        check_private_dir(directory)
        shape = (2, max(slot_items, 1))
        path = os.path.join(directory, f"g{gen}-r{rank}")
        self.mine = _map(path + ".buf", dtype, shape, create=True)  # exists before the listening socket does
        self.slots = {rank: self.mine}
        self.socks = {}
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path + ".sock")
            listener.listen(n_workers)
            deadline = time.monotonic() + timeout
            for peer in range(rank):  # connect to the lower ranks (they listen before connecting)
                self.socks[peer] = _connect(os.path.join(directory, f"g{gen}-r{peer}.sock"), deadline)
                _check_peer(self.socks[peer], peer)
                self.socks[peer].sendall(struct.pack("<q", rank))
            for _ in range(rank + 1, n_workers):  # accept the higher ranks
                listener.settimeout(max(deadline - time.monotonic(), 0.01))
                conn, _ = listener.accept()
                conn.setblocking(False)
                _check_peer(conn, "?")
                (peer,) = struct.unpack("<q", _recv_exactly(conn, 8, -1, "?", timeout))
                if not rank < peer < n_workers or peer in self.socks:
                    conn.close()
                    raise MeshBroken(-1, peer, f"claimed rank {peer}, not one of the unseen ranks above {rank}")
                self.socks[peer] = conn
        finally:
            listener.close()
            _unlink(path + ".sock")
        for peer, sock in self.socks.items():
            sock.setblocking(False)
            self.slots[peer] = _map(os.path.join(directory, f"g{gen}-r{peer}.buf"), dtype, shape, create=False)
        # Once every peer has mapped our slots the file needs no name; the (private) directory
        # stays until the driver closes the transport.
        self.exchange(-1, (0.0, 0, 0))
        _unlink(path + ".buf")

    def exchange(self, step, header):
        """Send this worker's header for step to every peer; {rank: header} of every worker."""
        blob = _HEADER.pack(step, *header)
        for peer, sock in self.socks.items():
            try:
                sock.sendall(blob)
            except OSError:
                raise MeshBroken(step, peer, "closed its connection") from None
        headers = {self.rank: _HEADER.unpack(blob)}
        for peer in sorted(self.socks):
            headers[peer] = _HEADER.unpack(_recv_exactly(self.socks[peer], _HEADER.size, step, peer,
                                                         self.timeout, self.spin_s))
            if headers[peer][0] != step:
                raise MeshBroken(step, peer, f"answered for step {headers[peer][0] + 1}")
        return headers

    def buffer(self, step):
        """This worker's slot for step's gradient sums (double-buffered by step parity)."""
        return self.mine[step % 2]

    def parts(self, step, headers):
        """[(rank, slot, loss sum, count)] of step for the ranks with rows, in rank order."""
        return [(rank, self.slots[rank][step % 2], h[1], h[2]) for rank, h in sorted(headers.items()) if h[2]]

    def close(self):
        for sock in self.socks.values():
            sock.close()
        self.socks = {}


def _map(path, dtype, shape, create):
    """A shared-memory slot file mapped into memory: made new (never following a symlink, mode
    0600) with create, else an existing regular file of this user's, read-only."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        os.ftruncate(fd, int(np.prod(shape)) * np.dtype(dtype).itemsize)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path}: not a regular file of this user; refusing it")
        with open(fd, "r+b" if create else "rb", closefd=False) as f:
            return np.asarray(np.memmap(f, dtype=dtype, mode="r+" if create else "r", shape=shape))
    finally:
        os.close(fd)


def _check_peer(sock, rank):
    """Refuse a connection from a process of another user (SO_PEERCRED)."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid != os.getuid():
        sock.close()
        raise MeshBroken(-1, rank, f"connected as user {uid}, not this user")


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _connect(path, deadline):
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.002)


def _recv_exactly(sock, n, step, peer, timeout, spin_s=0.0):
    """n bytes from a non-blocking socket: polled for spin_s seconds (no sleep, no wake-up
    latency), then waited for until timeout."""
    buf, got = bytearray(n), 0
    view = memoryview(buf)
    spin_until, deadline, poller = time.perf_counter() + spin_s, None, None
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except BlockingIOError:
            now = time.perf_counter()
            if now < spin_until:
                continue
            if poller is None:
                poller, deadline = select.poll(), now + timeout
                poller.register(sock, select.POLLIN)
            if now >= deadline or not poller.poll(max(deadline - now, 0.0) * 1000 + 1):
                raise MeshBroken(step, peer, "did not answer within cluster.step_timeout_s") from None
            continue
        except OSError:
            k = 0
        if k == 0:
            raise MeshBroken(step, peer, "closed its connection")
        got += k
    return bytes(buf)


class MeshWorker(RoundWorker):
    """The mesh side of one ShardWorker: its peers (the round loop is rounds.RoundWorker's)."""

    join_errors, broken, join_prefix = (OSError, MeshBroken), MeshBroken, "cannot connect: "

    def __init__(self, worker):
        super().__init__(worker)
        self.peers = None

    def run(self, start, request):
        with core_of_its_own(self.worker.rank, request["workers"]):
            return super().run(start, request)

    def join(self, r, n_items, dtype):
        if self.peers is None or self.peers.gen != r["gen"]:
            self.drop()
            self.peers = Peers(r["dir"], r["gen"], self.worker.rank, r["workers"], n_items, dtype, r["timeout"])
        return self.peers

    def drop(self):
        if self.peers is not None:
            self.peers.close()
            self.peers = None


@contextlib.contextmanager
def core_of_its_own(rank, workers):
    """Keep the calling thread on one core (the rank-th it may use) for the block, when the mesh
    has as many workers as this process has cores: each worker then steps on a core of its own
    anyway, and Ray's threads waking on it no longer move it to the other core, where it would
    start the step with a cold cache while its peers wait. With fewer workers than cores nothing
    is pinned: Ray assigns no core ids, so two jobs on a node would pin to the same cores."""
    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(allowed) != workers:
        yield
        return
    os.sched_setaffinity(0, {allowed[rank]})  # 0: this thread only (Linux)
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


def eligible(group, here):
    """Whether the mesh can run: every worker of the group on this (the driver's) node."""
    return set(group.bundle_nodes) == {here}


PREFIX = "distmlp-mesh-"  # + the driver's pid + "-": the directory of one run's mesh


def shm_dir():
    """Where the slots live: in memory (tmpfs) where there is one, so they are never written to a disk."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def make_dir():
    """A new private (0700) directory for a run's mesh, named after this (the driver's) process."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=shm_dir())


def sweep_stale():
    """Remove this user's mesh directories whose driver process is gone (killed before it could)."""
    base = shm_dir()
    for name in os.listdir(base):
        pid = name[len(PREFIX):].split("-")[0]
        path = os.path.join(base, name)
        if not (name.startswith(PREFIX) and pid.isdigit()) or os.path.exists(f"/proc/{pid}"):
            continue
        try:
            if os.lstat(path).st_uid == os.getuid() and stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path, ignore_errors=True)
        except FileNotFoundError:
            pass


def room_for(workers, n_items, itemsize):
    """Whether the shared-memory filesystem has room for every worker's double-buffered slots
    (Docker gives /dev/shm 64 MB; a full one kills a worker with SIGBUS instead of an error)."""
    need = workers * 2 * n_items * itemsize
    return shutil.disk_usage(shm_dir()).free >= 2 * need + (1 << 20)
