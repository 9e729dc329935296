"""The multi-node transport, worker side: one Ray collective allgather per step, many steps per call.

Across nodes the workers exchange gradient sums with Ray's collective library
(ray.util.collective, gloo backend, which needs torch) instead of sending them to the driver.
As in the one-node mesh (distmlp.mesh), each worker holds the weights, draws the step's batch
from the same sampler as the driver, computes the gradient sums of its own rows, and then
every worker gets every rank's part in one allgather of a byte buffer

    [header: step, loss sum, count, rank 0's "last step of the round" flag | flat gradient sums]

and applies the step with distmlp.step.apply_step over the parts in rank order: the same
arithmetic as the driver of the actor transport, so the same bits. The driver
(transport.CollectiveTransport) asks for a round of steps per actor call and gets the weights
back at its end; a round ends as in the mesh (rank 0 decides the time-based end).

A collective group lives for one generation: a new name after any failure or change of
workers. Its rendezvous store and gloo's sockets listen on the node's Ray address only (never
every interface): rank 0 binds the store's socket there and publishes it in Ray's internal
key-value store, and gloo is pointed at that address's interface (GLOO_SOCKET_IFNAME). Every
operation times out after cluster.step_timeout_s, so a dead or hung peer makes the others give
up the round (status BROKEN) instead of waiting for torch's 30-minute default.
"""

import datetime
import fcntl
import os
import socket
import struct
import time

import numpy as np
import ray
import ray.experimental.internal_kv as internal_kv

from distmlp.rounds import RoundWorker

_HEADER = struct.Struct("<qdqq")  # step, loss sum, count, rank 0: last step of the round (1) or not (0)
MAX_BROKEN = 10  # failed rounds with no worker lost; after that: actor calls
_KV_POLL_S = 0.02  # ranks > 0 poll Ray's key-value store this often for rank 0's store address


class CollectiveBroken(Exception):
    """The group could not be formed, or an allgather failed (a peer died or timed out)."""


def interface_of(address):
    """The name of the network interface that holds the IPv4 address (for GLOO_SOCKET_IFNAME)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:  # no IPv4 address on this interface
                continue
            if socket.inet_ntoa(packed[20:24]) == address:
                return name
    raise CollectiveBroken(f"no network interface holds this node's Ray address {address}")


class Group:
    """This worker's membership of one generation's collective group, and its buffers."""

    def __init__(self, name, rank, world, n_items, dtype, timeout):
        import torch  # the optional extra: imported only where the transport runs
        import torch.distributed as dist
        from ray.util import collective

        self.name, self.rank, self.world = name, rank, world
        self.collective, self.dist = collective, dist
        address = ray.util.get_node_ip_address()
        os.environ["GLOO_SOCKET_IFNAME"] = interface_of(address)  # gloo listens on this address only
        wait = datetime.timedelta(seconds=timeout)
        if dist.is_initialized():  # left by a generation that failed half-way
            dist.destroy_process_group()
        key = f"{name}-store"
        try:
            if rank == 0:
                # torch's store would listen on every interface: it gets a socket bound to the
                # node's address (and owns it from then on: the store closes it)
                listener = socket.create_server((address, 0), backlog=world)
                port = listener.getsockname()[1]
                store = dist.TCPStore(address, port, world, True, wait, wait_for_workers=False,
                                      master_listen_fd=listener.detach())
                internal_kv._internal_kv_put(key, f"{address}:{port}")
            else:
                host, port = _await_address(key, timeout)
                store = dist.TCPStore(host, port, world, False, wait)
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=wait)
            collective.init_collective_group(world, rank, backend="gloo", group_name=name,
                                             gloo_timeout=int(timeout * 1000))
            # Ray passes gloo_timeout only to its rendezvous; the group's operations get it here
            dist.distributed_c10d._set_pg_timeout(wait, collective.get_group_handle(name)._pg)
            if rank == 0:  # every rank has joined the store (init_process_group waits for that)
                internal_kv._internal_kv_del(key)
        except Exception as e:
            self.close()
            raise CollectiveBroken(f"cannot form collective group {name}: {str(e).strip().splitlines()[0]}") from None
        nbytes = _HEADER.size + n_items * np.dtype(dtype).itemsize
        self.send = np.zeros(nbytes, np.uint8)  # this rank's header and gradient sums
        self.mine = self.send[_HEADER.size:].view(dtype)
        self.received = [np.zeros(nbytes, np.uint8) for _ in range(world)]  # every rank's, after the allgather
        self.grads = [part[_HEADER.size:].view(dtype) for part in self.received]
        self.tensors = [torch.from_numpy(part) for part in self.received]  # the same memory
        self.send_tensor = torch.from_numpy(self.send)

    def exchange(self, step, header):
        """Every rank's header for step [(step, loss sum, count, last)] in rank order; the
        gradient sums written to self.mine arrive in self.grads."""
        _HEADER.pack_into(self.send, 0, step, *header)
        try:
            self.collective.allgather(self.tensors, self.send_tensor, self.name)
        except Exception as e:  # gloo raises RuntimeError subclasses naming the lost peer or the timeout
            raise CollectiveBroken(f"allgather of step {step + 1} failed: {str(e).strip().splitlines()[0]}") from None
        headers = [_HEADER.unpack_from(part) for part in self.received]
        for rank, h in enumerate(headers):
            if h[0] != step:
                raise CollectiveBroken(f"worker {rank} sent step {h[0] + 1} during step {step + 1}")
        return headers

    def buffer(self, step):
        """Where this rank writes step's gradient sums (sent by the next exchange)."""
        return self.mine

    def parts(self, step, headers):
        """[(rank, sums, loss sum, count)] of step for the ranks with rows, in rank order."""
        return [(rank, self.grads[rank], h[1], h[2]) for rank, h in enumerate(headers) if h[2]]

    def close(self):
        """Leave the group: Ray's group and the process group under it (with rank 0's store)."""
        if self.collective.is_group_initialized(self.name):
            self.collective.destroy_collective_group(self.name)
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def _await_address(key, timeout):
    """(host, port) of rank 0's store, once it has published it (within timeout seconds)."""
    deadline = time.monotonic() + timeout
    while (value := internal_kv._internal_kv_get(key)) is None:
        if time.monotonic() > deadline:
            raise CollectiveBroken(f"rank 0 did not publish its store address within {timeout:g} s")
        time.sleep(_KV_POLL_S)
    host, port = value.decode().rsplit(":", 1)
    return host, int(port)


class CollectiveWorker(RoundWorker):
    """The collective side of one ShardWorker: its group (the round loop is rounds.RoundWorker's)."""

    join_errors, broken = (ImportError, CollectiveBroken), CollectiveBroken

    def __init__(self, worker):
        super().__init__(worker)
        self.group = None

    def join(self, r, n_items, dtype):
        if self.group is None or self.group.name != r["group"]:
            self.drop()
            self.group = Group(r["group"], self.worker.rank, r["workers"], n_items, dtype, r["timeout"])
        return self.group

    def drop(self):
        if self.group is not None:
            self.group.close()
            self.group = None

