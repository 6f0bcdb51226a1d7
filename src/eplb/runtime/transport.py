"""EPLB's own transfer path: a side thread, side process groups and a side stream, never the serving ones.

Why: weight transfers posted on the serving EP group queue the next forward's all-to-all behind them, and every
``work.wait()``, ``.cpu()`` or blocking copy on the serving thread drains the device queue. So everything of EPLB
that blocks runs on :class:`SideChannel`'s one worker thread, in submission order (the same on every rank, so the
side groups' collectives match up), and the serving thread only submits jobs and reads ``Future.done()``.

Backends (:class:`TransferBackend`; chosen by the config's ``communicator``, see
:attr:`eplb.runtime.config.EplbConfig.transfer_backend`):

- ``gloo`` (the default, on every device): the rows to send are packed on the side stream and copied into pinned
  host buffers, sent and received on a Gloo group created for EPLB alone, and copied back into device staging on the
  side stream; the side stream waits on an event the serving stream recorded at post, and the serving stream waits
  on the side stream's event before it reads the staging at switch. No NCCL communicator is shared with serving.
- ``nccl`` (opt-in, ``communicator: torch_nccl``): device buffers sent on an NCCL communicator of its own, on the
  side stream. Risk: batched NCCL point-to-point can hang under load when another communicator runs on the same
  devices (pytorch#174288; vLLM refuses NCCL for async EPLB for this reason); a hang here stalls the side thread,
  not serving, and the next switch of a moved layer then waits (see the controller). Use it where Gloo's host
  staging is the bottleneck and the hang has been ruled out on that stack.
- NIXL: a backend is one class with :meth:`TransferBackend.exchange`; a NIXL one would register the staging arena
  and run reads instead of send/receive pairs.

Migration batching (vLLM's ``enable_migration_batching``): the exchange runs in ``W - 1`` rounds; in round ``d``
a rank sends only to ``rank + d`` and receives only from ``rank - d`` (mod ``W``), so it talks to at most one peer
in each direction at a time (less peak traffic on a link, more rounds).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError

__all__ = ["Message", "StagingArena", "TransferBackend", "GlooBackend", "NcclBackend", "SideChannel", "upload",
           "wait_for", "side_event", "hand_over"]

log = logging.getLogger(__name__)

_POLL_S = 0.001  # how often the idle side thread looks for a job


def upload(array, device) -> torch.Tensor:
    """int64 tensor of ``array`` on ``device``: from pinned memory with a non-blocking copy where there is a device
    (a blocking upload from pageable memory would wait for the stream), the array itself on the host."""
    host = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    device = torch.device(device)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def wait_for(stream) -> None:
    """Side thread: wait until ``stream``'s work so far is done (an event, not a stream sync, so CUDA's sync debug
    mode, which checks stream syncs, stays quiet about EPLB's side thread)."""
    if stream is not None:
        event = torch.cuda.Event()
        event.record(stream)
        event.synchronize()


def side_event(stream):
    """Side thread: an event marking ``stream``'s work so far (None on CPU)."""
    if stream is None:
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def hand_over(event, tensors) -> None:
    """Serving thread: order the serving stream after ``event`` (the side stream's work that produced ``tensors``)
    and tell the caching allocator the serving stream uses them, so their memory is not reused too early."""
    if event is None:
        return
    current = torch.cuda.current_stream(event.device)
    current.wait_event(event)
    for t in tensors:
        t.record_stream(current)


@dataclass
class Message:
    """One point-to-point message: ``tensor`` sent to or received from group rank ``peer`` with ``tag``."""

    peer: int
    tag: int
    tensor: torch.Tensor


class StagingArena:
    """One flat byte buffer, grown to the largest request seen and reused: views of it hold staged rows.

    Its size is what EPLB adds in staging memory (:attr:`nbytes`); it holds only the rows moved in one step,
    never a copy of a whole layer. Views are packed without padding (widest dtype first, so each starts on its own
    element size; with expert rows of a multiple of 256 bytes, as in real models, every view starts on 256 bytes),
    so the arena is exactly the bytes of the rows the schedule counts.
    """

    def __init__(self, device, pin: bool = False):
        self.device, self.pin = torch.device(device), pin
        self._buffer = torch.empty(0, dtype=torch.uint8, device=self.device)

    @property
    def nbytes(self) -> int:
        return int(self._buffer.numel())

    def views(self, specs: list[tuple[tuple, torch.dtype]]) -> list[torch.Tensor]:
        """Tensors of the given ``(shape, dtype)``, carved from the arena (valid until the next call)."""
        widths = [torch.empty(0, dtype=dtype).element_size() for _, dtype in specs]
        offsets, total = [0] * len(specs), 0
        for index in sorted(range(len(specs)), key=lambda i: -widths[i]):
            offsets[index] = total
            total += torch.Size(specs[index][0]).numel() * widths[index]
        if total > self._buffer.numel():
            self._buffer = torch.empty(total, dtype=torch.uint8, device=self.device, pin_memory=self.pin)
        out = []
        for (shape, dtype), offset, width in zip(specs, offsets, widths):
            size = torch.Size(shape).numel() * width
            out.append(self._buffer[offset:offset + size].view(dtype).view(shape))
        return out


def _rounds(rank: int, world: int, batching: bool) -> list[tuple[int | None, int | None]]:
    """(send peer, receive peer) per round: all peers in one round, or one peer each way per round."""
    if not batching:
        return [(None, None)]
    return [((rank + d) % world, (rank - d) % world) for d in range(1, world)]


class TransferBackend:
    """Moves :class:`Message` s between the ranks of EPLB's side group. :meth:`exchange` runs on the side thread
    only (it blocks it, never the serving thread)."""

    name = ""

    def __init__(self, group, rank: int, ep_ranks: list[int], device, batching: bool = False):
        self.group, self.rank, self.batching = group, rank, batching
        self.ep_ranks, self.world = list(ep_ranks), len(ep_ranks)
        self.device = torch.device(device)

    def peer(self, rank: int) -> int:
        """The global rank of EP rank ``rank`` (point-to-point calls name peers by global rank; fixed at start, so
        it holds in the survivors' group after a failure, where ranks keep their EP ids)."""
        return self.ep_ranks[rank]

    @property
    def staging_bytes(self) -> int:
        """Host staging this backend holds (bytes)."""
        return 0

    def exchange(self, sends: list[Message], recvs: list[Message], stream=None) -> None:
        """Send ``sends``, fill ``recvs``; returns when every receive landed (on ``stream`` for device copies)."""
        raise NotImplementedError


class GlooBackend(TransferBackend):
    """Gloo point-to-point on host tensors; device rows go through a pinned host arena (copies on ``stream``)."""

    name = "gloo"

    def __init__(self, group, rank: int, ep_ranks: list[int], device, batching: bool = False):
        super().__init__(group, rank, ep_ranks, device, batching)
        self._on_host = self.device.type == "cpu"
        self._host = StagingArena("cpu", pin=not self._on_host and torch.cuda.is_available())

    @property
    def staging_bytes(self) -> int:
        return self._host.nbytes

    def exchange(self, sends, recvs, stream=None):
        if not sends and not recvs:
            return
        if self._on_host:  # host tensors travel as they are
            send_buf = [m.tensor for m in sends]
            recv_buf = [m.tensor for m in recvs]
        else:
            staged = self._host.views([(tuple(m.tensor.shape), m.tensor.dtype) for m in sends + recvs])
            send_buf, recv_buf = staged[:len(sends)], staged[len(sends):]
            with torch.cuda.stream(stream):
                for host, m in zip(send_buf, sends):
                    host.copy_(m.tensor, non_blocking=True)
            wait_for(stream)  # the side thread waits for its own stream only
        for to, frm in _rounds(self.rank, self.world, self.batching):
            works = [dist.isend(buf, self.peer(m.peer), self.group, m.tag)
                     for buf, m in zip(send_buf, sends) if to is None or m.peer == to]
            works += [dist.irecv(buf, self.peer(m.peer), self.group, m.tag)
                      for buf, m in zip(recv_buf, recvs) if frm is None or m.peer == frm]
            for work in works:
                work.wait()
        if not self._on_host:
            with torch.cuda.stream(stream):
                for host, m in zip(recv_buf, recvs):
                    m.tensor.copy_(host, non_blocking=True)
            wait_for(stream)  # the pinned arena is reused by the next exchange


class NcclBackend(TransferBackend):
    """NCCL point-to-point on device tensors, on a communicator of EPLB's own and on ``stream`` (see the module
    docstring for the hang risk)."""

    name = "nccl"

    def exchange(self, sends, recvs, stream=None):
        if not sends and not recvs:
            return
        with torch.cuda.stream(stream):
            for to, frm in _rounds(self.rank, self.world, self.batching):
                ops = [dist.P2POp(dist.isend, m.tensor, self.peer(m.peer), self.group, m.tag)
                       for m in sends if to is None or m.peer == to]
                ops += [dist.P2POp(dist.irecv, m.tensor, self.peer(m.peer), self.group, m.tag)
                        for m in recvs if frm is None or m.peer == frm]
                if ops:
                    for work in dist.batch_isend_irecv(ops):
                        work.wait()  # orders ``stream`` after the transfers
        wait_for(stream)


BACKENDS = {"gloo": GlooBackend, "nccl": NcclBackend}


class SideChannel:
    """EPLB's side thread, side groups and side stream for one rank of the EP group.

    Args:
        group: the serving EP group (None: the default group); only its membership is used.
        backend: ``"gloo"`` or ``"nccl"`` (:data:`BACKENDS`).
        device: the device of the expert weights.
        batching: migration batching (one peer each way at a time).

        ep_ranks: global rank of every EP rank, when ``group`` holds the survivors of a failure only.

    Collective: every rank of ``group`` constructs it, in the same order relative to other group creations.
    """

    def __init__(self, group=None, backend: str = "gloo", device="cpu", batching: bool = False,
                 ep_ranks: list[int] | None = None):
        if backend not in BACKENDS:
            raise EplbError(f"transfer backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = torch.device(device)
        distributed = dist.is_available() and dist.is_initialized()
        size = dist.get_world_size(group) if distributed else 1
        members = [dist.get_global_rank(group, r) if group is not None else r for r in range(size)]
        #: global rank of every EP rank (the EP group at start; ``ep_ranks`` after a failure)
        self.ep_ranks = list(ep_ranks) if ep_ranks is not None else members
        #: members of the side group (the live ranks)
        self.world = size
        self.rank = self.ep_ranks.index(dist.get_rank()) if distributed else 0
        #: Gloo group of EPLB's own: agreements, window gathers, and the ``gloo`` backend's transfers
        self.cpu_group = None
        data_group = None
        if size > 1:
            # the whole world creates it together; a subgroup (the survivors of a failure) without the others
            local = size != dist.get_world_size()
            self.cpu_group = dist.new_group(members, backend="gloo", use_local_synchronization=local)
            data_group = self.cpu_group
            if backend == "nccl":
                data_group = dist.new_group(members, backend="nccl", use_local_synchronization=local)
        self.backend = BACKENDS[backend](data_group, self.rank, self.ep_ranks, self.device, batching)
        self.backend_name = backend
        self.batching = batching
        #: the side stream (None on CPU): staging copies and NCCL transfers run here, never on the serving stream
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # a deque the side thread polls, not a queue that wakes it: waking it hands it the GIL at once, which cost the
        # serving thread ~0.8 ms per submit (measured); a poll every millisecond costs it nothing it waits for
        self._jobs: collections.deque = collections.deque()
        self._lock = threading.Lock()  # between the side thread taking a job and :meth:`abort`
        self._running: Future | None = None
        self._aborted: BaseException | None = None
        # a daemon thread: a job stuck on a dead peer must not keep the process from exiting
        self._thread = threading.Thread(target=self._loop, name="eplb-side", daemon=True)
        self._thread.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the side thread after every job submitted before it."""
        future: Future = Future()
        if self._aborted is not None:
            future.set_exception(self._aborted)
        else:
            self._jobs.append((future, fn, args, kwargs))
        return future

    def _loop(self) -> None:
        if self.stream is not None:  # this thread's device work runs on the side stream (both are per thread)
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.stream)
        while True:
            if not self._jobs:
                time.sleep(_POLL_S)
                continue
            with self._lock:
                job = self._jobs.popleft()
                if job is None or self._aborted is not None:
                    return
                future, fn, args, kwargs = job
                if not future.set_running_or_notify_cancel():
                    continue
                self._running = future
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
                log.warning("eplb side thread: %s failed: %s", getattr(fn, "__name__", fn), exc)
                result, error = None, exc
            else:
                error = None
            with self._lock:
                self._running = None
                if self._aborted is not None:  # its future already failed; the result is of no use
                    return
                if error is None:
                    future.set_result(result)
                else:
                    future.set_exception(error)

    def drain(self) -> None:
        """Wait until every job submitted so far ran (tests and shutdown; never in a serving step)."""
        self.submit(lambda: None).result()

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Side thread only: ``tensor`` (host) reduced over the side group, blocking this thread."""
        if self.world > 1:
            dist.all_reduce(tensor, op=op, group=self.cpu_group)
        return tensor

    def record_event(self):
        """Serving thread: an event on the serving stream now (None on CPU), for the side stream to wait on."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def abort(self, exc: BaseException) -> None:
        """Any thread (the heartbeat's, when a peer failed): fail the running job and every queued one with ``exc``,
        at once, so a serving thread waiting on one gets ``exc`` instead of hanging, and run no more jobs. A job
        blocked on the dead peer stays blocked until its group's timeout (a Gloo operation in progress cannot be
        cancelled) and its result is dropped; abort an NCCL group to end it sooner
        (:func:`eplb.runtime.heartbeat.abort_nccl`)."""
        with self._lock:
            if self._aborted is not None:
                return
            self._aborted = exc
            jobs = [job for job in self._jobs if job is not None]
            self._jobs.clear()
            self._jobs.append(None)
            futures = [job[0] for job in jobs] + ([self._running] if self._running is not None else [])
        for future in futures:
            if not future.done():
                future.set_exception(exc)

    def rebuilt(self, group) -> "SideChannel":
        """A new channel over ``group`` (the survivors of a failure; collective over it), same settings and EP ids.
        This one is closed without waiting: a job of it may hang on a dead peer until its group's timeout."""
        self.close(wait=False)
        return SideChannel(group, self.backend_name, self.device, self.batching, self.ep_ranks)

    def close(self, wait: bool = True) -> None:
        """Stop the side thread (``wait=False``: do not wait for a job that may hang on a dead peer)."""
        self._jobs.append(None)
        if wait:
            self._thread.join()
