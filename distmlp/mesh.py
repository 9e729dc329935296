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

A full batch (gd) is computed in chunks of rows (kernels.chunked_grad_sums), and on one node
every worker can read every row (the node's one copy of the data), so the workers share the
chunks (SharedBatch): a worker done with its own computes a slower peer's remaining chunks and
writes their sums into the peer's ChunkFile, and each worker adds its chunks' sums in chunk
order as before. The sums keep their bits; a step no longer waits for the slowest worker's
whole share. A worker that dies holding a peer's chunk closes its sockets, and the peer waiting
for that chunk sees it as it would at the exchange.
"""

import contextlib
import fcntl
import mmap
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import time

import numpy as np

from distmlp import kernels, mlp, step as contract
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

    def __init__(self, directory, gen, rank, n_workers, slot_items, dtype, timeout, chunks=None):
        """chunks: (first row, end row, rows per chunk) of this worker's rows in a full-batch
        step, to share them with the peers (ChunkFile, SharedBatch); None: not shared."""
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
        self.chunks = {} if chunks is None else {rank: ChunkFile(path + ".chunks", dtype, slot_items, chunks)}
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
            if self.chunks:
                self.chunks[peer] = ChunkFile(os.path.join(directory, f"g{gen}-r{peer}.chunks"), dtype, slot_items)
        # Once every peer has mapped our slots the file needs no name; the (private) directory
        # stays until the driver closes the transport.
        self.exchange(-1, (0.0, 0, 0))
        _unlink(path + ".buf")
        _unlink(path + ".chunks")

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

    def dead_peer(self, peer):
        """Whether peer's socket is at end of file (its process is gone); data waiting is not."""
        try:
            return self.socks[peer].recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def close(self):
        for sock in self.socks.values():
            sock.close()
        self.socks = {}
        for chunk_file in self.chunks.values():
            chunk_file.close()
        self.chunks = {}


class ChunkFile:
    """One worker's chunks of a full-batch step in a shared-memory file: the queue of chunks
    not yet taken, which its owner takes from the front and its peers from the back, under an
    fcntl lock on the file, and the sums of the chunks its peers took. Made by the owner (spec =
    (first row, end row, rows per chunk)) or opened by a peer (spec None)."""

    _INTS = 8  # the header: step, front, back, chunks, first row, end row, rows per chunk, unused

    def __init__(self, path, dtype, n_items, spec=None):
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT | os.O_EXCL if spec else 0)
        self.fd = os.open(path, flags, 0o600)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError(f"{path}: not a regular file of this user; refusing it")
            if spec:
                first, end, rows = spec
                n = -(-(end - first) // rows)
            else:
                n = int(np.frombuffer(os.pread(self.fd, 8 * self._INTS, 0), np.int64)[3])
            itemsize = np.dtype(dtype).itemsize
            size = 8 * (self._INTS + 3 * n) + n * n_items * itemsize
            if spec:
                os.ftruncate(self.fd, size)
            elif n < 0 or st.st_size != size:
                raise PermissionError(f"{path}: {st.st_size} bytes, not a chunk file of {n} chunks; refusing it")
            memory = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        ints = np.frombuffer(memory, np.int64, self._INTS + 2 * n)
        self.header, self.taker, self.done = ints[:self._INTS], ints[self._INTS:self._INTS + n], ints[self._INTS + n:]
        self.loss = np.frombuffer(memory, np.float64, n, 8 * (self._INTS + 2 * n))
        self.sums = np.frombuffer(memory, dtype, n * n_items, 8 * (self._INTS + 3 * n)).reshape(n, n_items)
        if spec:
            self.header[3:7] = (n, *spec)
        self.n, self.first, self.end, self.rows = (int(v) for v in self.header[3:7])

    @contextlib.contextmanager
    def locked(self):
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 8, 0)
        try:
            yield self.header
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 8, 0)

    def rows_of(self, k):
        """The rows [lo, hi) of chunk k."""
        lo = self.first + k * self.rows
        return lo, min(lo + self.rows, self.end)

    def close(self):
        os.close(self.fd)  # the mapping goes with the last view of it


class SharedBatch:
    """A full-batch step whose chunks the workers of a node share (Peers made with chunks).

    Each worker computes its own chunks from the front of its queue, a share of what is left at
    a time; once its queue is empty it computes its peers' untaken chunks from the back of
    theirs and writes their sums into the peer's file. Then it adds its chunks' sums in chunk
    order, its own and those its peers computed, exactly as kernels.chunked_grad_sums adds them
    in one process: the sums are the same bits whoever computed which chunk, and a worker that
    a busy core slows down no longer holds the others up for the whole of its share.
    """

    TAKE = 4  # an owner takes this fraction (1/TAKE) of its untaken chunks at a time, at least one

    def __init__(self, peers, kernel, x_uint8, labels):
        self.peers, self.kernel, self.x, self.labels = peers, kernel, x_uint8, labels  # every row of the node
        self.taken = 0  # peers' chunks this worker computed (MeshWorker.run counts a round's)

    def grad_sums(self, params, step):
        """(gradient sums keyed like params, loss sum, count) of this worker's rows for step."""
        mine = self.peers.chunks[self.peers.rank]
        with mine.locked() as header:
            header[:3] = (step, 0, mine.n)
        total, loss_sum = None, 0.0
        while True:
            with mine.locked() as header:
                front, back = int(header[1]), int(header[2])
                stop = min(back, front + max(1, (back - front) // self.TAKE))
                header[1] = stop
            if front >= stop:
                break
            for k in range(front, stop):
                grads, part_loss = self._chunk(mine, k, params)
                total = kernels.add_sums(total, grads)
                loss_sum += part_loss
        self.taken += self._take_from_peers(params, step)
        for k in range(back, mine.n):  # taken by peers: their sums, in chunk order
            self._wait(mine, k, step)
            sums = contract.unflatten(mine.sums[k], params)
            if total is None:  # the first chunk was a peer's: copied, as the file is rewritten next step
                sums = {name: a.copy() for name, a in sums.items()}
            total = kernels.add_sums(total, sums)
            loss_sum += float(mine.loss[k])
        return total, loss_sum, mine.end - mine.first

    def _chunk(self, owner, k, params):
        lo, hi = owner.rows_of(k)
        return self.kernel.chunk_sums(params, self.x[lo:hi], self.labels[lo:hi])

    def _take_from_peers(self, params, step):
        """Compute the peers' untaken chunks of step, from the back of their queues; how many."""
        taken, rank, n = 0, self.peers.rank, self.peers.n
        for peer in [(rank + i) % n for i in range(1, n)]:
            owner = self.peers.chunks[peer]
            while True:
                with owner.locked() as header:
                    if header[0] != step or header[2] <= header[1]:
                        break
                    header[2] -= 1
                    k = int(header[2])
                    owner.taker[k] = rank
                grads, part_loss = self._chunk(owner, k, params)
                contract.flatten(grads, mlp.param_names(len(params) // 2), out=owner.sums[k])
                owner.loss[k] = part_loss
                with owner.locked():  # the lock orders the sums before the mark
                    owner.done[k] = step + 1
                taken += 1
        return taken

    def _wait(self, mine, k, step):
        """Until the peer that took chunk k of step has written its sums."""
        start, peer = time.perf_counter(), int(mine.taker[k])
        spin_until, deadline = start + self.peers.spin_s, start + self.peers.timeout
        while True:
            if mine.done[k] == step + 1:
                with mine.locked():  # orders the peer's sums before what this worker reads next
                    return
            now = time.perf_counter()
            if self.peers.dead_peer(peer):
                raise MeshBroken(step, peer, "closed its connection")
            if now >= deadline:
                raise MeshBroken(step, peer, "did not finish a chunk it took within cluster.step_timeout_s")
            if now >= spin_until:
                time.sleep(0.0001)


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
        self.peers, self.shared = None, None

    def run(self, start, request):
        if self.shared is not None:
            self.shared.taken = 0
        with core_of_its_own(self.worker.rank, request["workers"]):
            out = super().run(start, request)
        out["chunks_taken"] = 0 if self.shared is None else self.shared.taken  # the peers' chunks it computed
        return out

    def join(self, r, n_items, dtype):
        if self.peers is None or self.peers.gen != r["gen"]:
            self.drop()
            w = self.worker
            # full batches: the chunks are shared where every worker can read every row of the node
            share = (r["workers"] > 1 and w.node_train is not None and w.kernel.chunk_rows
                     and r["sampler"].batch(r["first"]) is None)
            chunks = (*w.train_range, w.kernel.chunk_rows) if share else None
            self.peers = Peers(r["dir"], r["gen"], w.rank, r["workers"], n_items, dtype, r["timeout"], chunks)
            self.shared = SharedBatch(self.peers, w.kernel, *w.node_train) if share else None
        return self.peers

    def drop(self):
        if self.peers is not None:
            self.peers.close()
            self.peers, self.shared = None, None


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


def room_for(workers, n_items, itemsize, chunks=0):
    """Whether the shared-memory filesystem has room for every worker's double-buffered slots
    and, for full batches, the sums of its `chunks` chunks (ChunkFile) (Docker gives /dev/shm
    64 MB; a full one kills a worker with SIGBUS instead of an error)."""
    need = workers * (2 + chunks) * n_items * itemsize
    return shutil.disk_usage(shm_dir()).free >= 2 * need + (1 << 20)
