"""EPLB's own transfer path: side threads, side process groups and a side stream, never the serving ones.

Why: weight transfers posted on the serving EP group queue the next forward's all-to-all behind them, and every
``work.wait()``, ``.cpu()`` or blocking copy on the serving thread drains the device queue. So everything of EPLB
that blocks runs on :class:`SideChannel`'s side thread (:class:`~eplb.runtime.worker.SideWorker`), in submission
order (the same on every rank, so the collectives on its group match up): transfers and window gathers, on a Gloo
group of EPLB's own. The serving thread only submits jobs and reads ``Future.done()``, and starts the ranks'
agreements, asynchronous all-reduces of a few integers on another Gloo group (:class:`~eplb.runtime.agreement.
Agreement`), so an agreement never queues behind a transfer or waits for a Python thread to be scheduled.

Backends (:class:`TransferBackend`; chosen by the config's ``communicator``, see
:attr:`eplb.runtime.config.EplbConfig.transfer_backend`); rows always travel as raw integers (their bytes, read as
the widest integer type that divides a row), whatever their dtype (fp8, packed int4, block scales), so no backend or
copy op has to know the dtype:

- ``gloo`` (the default, on every device): the rows to send are copied on the side stream into a pinned host arena,
  sent and received on EPLB's Gloo group, and copied back into device staging on the side stream; the side stream
  waits on an event the serving stream recorded at post, and the serving stream waits on the side stream's event
  before it reads the staging at switch. No NCCL communicator is shared with serving.
- ``nccl`` (opt-in, ``communicator: torch_nccl``): device buffers sent on an NCCL communicator of EPLB's own, on the
  side stream. It is initialised when the channel is built, with one all-reduce (a lazily created communicator
  would be initialised by the first point-to-point call, which a rank with nothing to send skips: a hang). Risk:
  batched NCCL point-to-point can hang under load when another communicator runs on the same devices
  (pytorch#174288; vLLM refuses NCCL for async EPLB for this reason). Serving never waits for a transfer; one that
  has not landed by ``transfer_deadline_s`` is abandoned on every rank, EPLB's NCCL communicator is aborted (which
  ends the hung call) and later transfers go over the Gloo group (:meth:`SideChannel.abandon_nccl`).
- NIXL: a backend is one class with :meth:`TransferBackend.exchange`; a NIXL one would register the staging arena
  and run reads instead of send/receive pairs.

Migration batching (vLLM's ``enable_migration_batching``): the exchange runs in ``W - 1`` rounds; in round ``d``
a rank sends only to ``rank + d`` and receives only from ``rank - d`` (mod ``W``), so it talks to at most one peer
in each direction at a time (less peak traffic on a link, more rounds).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from eplb.errors import EplbError
from eplb.runtime.agreement import Agreement, Status, collective
from eplb.runtime.heartbeat import abort_nccl
from eplb.runtime.worker import SideWorker

__all__ = ["Message", "StagingArena", "TransferBackend", "GlooBackend", "NcclBackend", "SideChannel", "upload",
           "wait_for", "side_event", "runtime_device"]

log = logging.getLogger(__name__)


def runtime_device(device) -> torch.device:
    """``device`` as the runtime uses it: ``cpu``, or ``cuda`` with its index (``cuda`` alone means the current
    device, so that every thread sets the same one).

    Raises:
        EplbError: not a device, or one the runtime cannot use (another type, CUDA absent, an index out of range).
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EplbError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r} ({exc})") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise EplbError(f"device {str(device)!r} is not one the EPLB runtime can use; expected cpu or cuda")
    if not torch.cuda.is_available():
        raise EplbError(f"device {str(device)!r}: CUDA is not available to this torch build ({torch.__version__})")
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < torch.cuda.device_count():
        raise EplbError(f"device {str(device)!r}: expected an index in [0, {torch.cuda.device_count()})")
    return torch.device("cuda", index)


def upload(array, device) -> torch.Tensor:
    """int64 tensor of ``array`` on ``device``: from pinned memory with a non-blocking copy where there is a device
    (a blocking upload from pageable memory would wait for the stream), the array itself on the host."""
    host = np.ascontiguousarray(array, dtype=np.int64)
    host = torch.from_numpy(host if host.flags.writeable else host.copy())  # a read-only view (a placement's rows)
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


@dataclass
class Message:
    """One point-to-point message: ``tensor`` sent to or received from group rank ``peer`` with ``tag``."""

    peer: int
    tag: int
    tensor: torch.Tensor


class StagingArena:
    """One flat byte buffer, grown to the largest request seen and reused: views of it hold staged rows.

    Its size is what EPLB adds in staging memory (:attr:`nbytes`); it holds only the rows moved in one step,
    never a copy of a whole layer. Views are packed without padding, widest element first, so each starts on its own
    element size; the arena is exactly the bytes of the rows the schedule counts.
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
        return [self._buffer[offset:offset + torch.Size(shape).numel() * width].view(dtype).view(shape)
                for (shape, dtype), offset, width in zip(specs, offsets, widths)]


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
    docstring for the hang risk and what happens when a transfer hangs)."""

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
        wait_for(stream)  # the host learns that they landed


BACKENDS = {"gloo": GlooBackend, "nccl": NcclBackend}


def _serving_stream(stream, device: torch.device):
    """The stream the forward runs on: ``stream``, or the current one of ``device`` (None on CPU)."""
    if device.type != "cuda":
        if stream is not None:
            raise EplbError(f"stream is for a CUDA device; the device is {device}")
        return None
    if stream is None:
        return torch.cuda.current_stream(device)
    if not isinstance(stream, torch.cuda.Stream) or stream.device != device:
        raise EplbError(f"stream must be a torch.cuda.Stream of {device}, got {stream!r}")
    return stream


class SideChannel:
    """EPLB's side threads, side groups and side stream for one rank of the EP group.

    Args:
        group: the serving EP group (None: the default group); only its membership is used.
        backend: ``"gloo"`` or ``"nccl"`` (:data:`BACKENDS`).
        device: the device of the expert weights (:func:`runtime_device`).
        batching: migration batching (one peer each way at a time).
        ep_ranks: global rank of every EP rank, when ``group`` holds the survivors of a failure only.
        stream: the stream the forward runs on (default: the device's current stream now; None on CPU): events
            EPLB's side stream waits on are recorded on it, and it waits on the side stream before it reads staged
            rows or new tables.

    Collective: every rank of ``group`` constructs it, in the same order relative to other group creations.

    Raises:
        EplbError: a device or stream the runtime cannot use, or a backend the build lacks (nothing is started).
    """

    def __init__(self, group=None, backend: str = "gloo", device="cpu", batching: bool = False,
                 ep_ranks: list[int] | None = None, stream=None):
        if backend not in BACKENDS:
            raise EplbError(f"transfer backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        self.device = runtime_device(device)
        if backend == "nccl" and (self.device.type != "cuda" or not dist.is_nccl_available()):
            raise EplbError(f"the nccl transfer backend (communicator torch_nccl) needs a CUDA device and a torch "
                            f"build with NCCL; the device is {self.device}, NCCL "
                            f"{'available' if dist.is_nccl_available() else 'absent'}")
        #: the stream the forward runs on (None on CPU)
        self.serving_stream = _serving_stream(stream, self.device)
        distributed = dist.is_available() and dist.is_initialized()
        size = dist.get_world_size(group) if distributed else 1
        members = [dist.get_global_rank(group, r) if group is not None else r for r in range(size)]
        #: global rank of every EP rank (the EP group at start; ``ep_ranks`` after a failure)
        self.ep_ranks = list(ep_ranks) if ep_ranks is not None else members
        #: members of the side group (the live ranks)
        self.world = size
        self.rank = self.ep_ranks.index(dist.get_rank()) if distributed else 0
        #: Gloo groups of EPLB's own: the side thread's (window gathers, the ``gloo`` backend's transfers) and the
        #: agreements' (nothing else runs on it)
        self.cpu_group = self.agree_group = None
        data_group = None
        if size > 1:
            # the whole world creates them together; a subgroup (the survivors of a failure) without the others
            local = size != dist.get_world_size()
            self.cpu_group = dist.new_group(members, backend="gloo", use_local_synchronization=local)
            self.agree_group = dist.new_group(members, backend="gloo", use_local_synchronization=local)
            data_group = self.cpu_group
            if backend == "nccl":
                data_group = dist.new_group(members, backend="nccl", use_local_synchronization=local)
                _initialise(data_group, self.device)
        self.backend = BACKENDS[backend](data_group, self.rank, self.ep_ranks, self.device, batching)
        self.backend_name = backend
        self.batching = batching
        #: the side stream (None on CPU): staging copies and NCCL transfers run here, never on the serving stream
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._side = SideWorker("side", self._on_device)
        self._aborted: BaseException | None = None

    def _on_device(self) -> None:
        """The side thread's device and stream (both are per thread)."""
        if self.stream is not None:
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.stream)

    @property
    def died(self):
        """:class:`~eplb.runtime.worker.SideThreadDied` when the side thread died, else None."""
        return self._side.died

    def submit(self, fn, *args, **kwargs):
        """Run ``fn(*args, **kwargs)`` on the side thread after every job submitted to it before."""
        return self._side.submit(fn, *args, **kwargs)

    def agree(self, status: Status, checksum: int = 0) -> Agreement:
        """Serving thread: start an agreement on this rank's ``status`` and ``checksum`` over the agreement group
        (:class:`~eplb.runtime.agreement.Agreement`; alone, agreed at once)."""
        return Agreement(status, checksum, self.agree_group if self.world > 1 else None, lambda: self._aborted)

    def drain(self) -> None:
        """Wait until every job submitted so far ran on the side thread (tests and shutdown; never in a serving
        step)."""
        self._side.drain()

    def record_event(self):
        """Serving thread: an event on the serving stream now (None on CPU), for the side stream to wait on."""
        if self.serving_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.serving_stream)
        return event

    def hand_over(self, event, tensors) -> None:
        """Serving thread: order the serving stream after ``event`` (the side stream's work that produced
        ``tensors``) and tell the caching allocator the serving stream uses them, so their memory is not reused too
        early."""
        if event is None:
            return
        self.serving_stream.wait_event(event)
        for t in tensors:
            t.record_stream(self.serving_stream)

    def abandon_nccl(self) -> bool:
        """Serving thread, when every rank abandoned a transfer that missed its deadline: abort EPLB's NCCL
        communicator, on a thread of its own (an abort can take a while; a hung ``batch_isend_irecv`` on the side
        thread then ends with an error), and move later transfers to the Gloo group. Returns whether there was
        one."""
        if self.backend_name != "nccl":
            return False
        threading.Thread(target=abort_nccl, args=(self.backend.group,), name="eplb-nccl-abort", daemon=True).start()
        self.backend = GlooBackend(self.cpu_group, self.rank, self.ep_ranks, self.device, self.batching)
        self.backend_name = "gloo"
        log.error("eplb: a transfer on EPLB's NCCL communicator did not land in time on some rank; the communicator "
                  "was aborted and later transfers use the Gloo side group")
        return True

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """Side thread only: ``tensor`` (host) reduced over the side group, blocking this thread."""
        if self.world > 1:
            collective(dist.all_reduce, tensor, op=op, group=self.cpu_group)
        return tensor

    def abort(self, exc: BaseException) -> None:
        """Any thread (the heartbeat's, when a peer failed): fail the running job and every queued one of both
        threads with ``exc``, at once, so a serving thread reading one gets ``exc``, and run no more jobs. A job
        blocked on the dead peer stays blocked until its group's timeout (a Gloo operation in progress cannot be
        cancelled) and its result is dropped; abort an NCCL group to end it sooner
        (:func:`eplb.runtime.heartbeat.abort_nccl`)."""
        self._aborted = exc
        self._side.abort(exc)

    def rebuilt(self, group) -> "SideChannel":
        """A new channel over ``group`` (the survivors of a failure; collective over it), same settings, EP ids and
        serving stream. This one is closed without waiting: a job of it may hang on a dead peer until its group's
        timeout."""
        self.close(wait=False)
        return SideChannel(group, self.backend_name, self.device, self.batching, self.ep_ranks, self.serving_stream)

    def close(self, wait: bool = True) -> None:
        """Stop the side thread (``wait=False``: do not wait for a job that may hang on a dead peer)."""
        self._side.close(wait)


def _initialise(group, device: torch.device) -> None:
    """Initialise an NCCL communicator now, with one all-reduce, while every rank constructs the channel."""
    probe = torch.zeros(1, device=device)
    dist.all_reduce(probe, group=group)
    torch.cuda.synchronize(device)
