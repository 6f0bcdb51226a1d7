"""Catch, on CPU, the host syncs the serving thread would make on an accelerator.

The sync-free contract says that EPLB's hooks (``before_forward``, ``route``, ``after_forward``) never make the
serving thread wait. CUDA's sync debug mode catches some violations on a GPU (stream syncs and blocking copies); this
guard catches them and more on any device, CPU included, by wrapping the entry points that block or that would block
on a device. Inside ``with guard.serving():`` on the thread that entered it, each call to one of them is recorded in
:attr:`SyncGuard.hits`:

- a host read of a tensor: ``Tensor.item``, ``.cpu``, ``.tolist``, ``.numpy``, ``bool()`` / ``int()`` / ``float()``
  / ``operator.index()`` of a tensor;
- host data written into a tensor (``t[i] = 3``, ``t[mask] = x``, an index given as a list or an array): on a device,
  a blocking upload, which a CUDA graph cannot capture;
- a tensor built from host data (``torch.as_tensor``, ``torch.tensor``) or copied between the host and a device
  without ``non_blocking`` (``.to``, ``.copy_``);
- an op whose output size depends on the data (``torch.nonzero``, ``argwhere``, ``masked_select``, ``unique``,
  one-argument ``torch.where``) or boolean-mask indexing (``t[mask]``): the host must read the size;
- a wait: ``Work.wait`` on work not yet complete, reading a side-thread result that is not ready
  (``Future.result``, ``Future.exception``), ``Event.synchronize``, ``Stream.synchronize``, ``torch.cuda.synchronize``;
- any collective or point-to-point call, except an asynchronous one (``async_op=True``) of host tensors on a group
  other than the default one: EPLB's agreements, which Gloo's own threads run (waiting for one that is not complete
  is ``Work.wait``, counted above).

From any thread, a collective on the default group (the serving group) counts in
:attr:`SyncGuard.serving_group_calls`: EPLB's traffic runs on groups of its own.

Installing patches ``torch``, ``torch.distributed`` and ``concurrent.futures`` for the whole process and cannot be
undone: use it in a process of its own (the contract test, ``benchmarks/gpu_check.py``, ``eplb doctor``).
"""

from __future__ import annotations

import concurrent.futures
import threading
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["SyncGuard"]

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "barrier",
                "reduce_scatter_tensor", "all_to_all_single", "isend", "irecv", "send", "recv", "batch_isend_irecv")
_HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__complex__")
_DATA_SIZED = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive")


def _host_index(index) -> bool:
    """Whether an index needs the host: a boolean mask (its size is data), or a list or array of host data."""
    parts = index if isinstance(index, tuple) else (index,)
    for part in parts:
        if isinstance(part, torch.Tensor) and part.dtype in (torch.bool, torch.uint8):
            return True
        if isinstance(part, (list, np.ndarray)):
            return True
    return False


def _crosses_host(source: torch.Tensor, target, non_blocking: bool) -> bool:
    """A copy between the host and a device that is not asked to be non-blocking."""
    if non_blocking or target is None:
        return False
    return (source.device.type == "cpu") != (torch.device(target).type == "cpu")


def _on_host(args, kwargs) -> bool:
    """Every tensor of a collective's arguments is a host tensor."""
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    return all(t.device.type == "cpu" for t in tensors)


def _to_target(args, kwargs):
    """The device a ``Tensor.to`` call copies to (None: it names none)."""
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (torch.device, str)):
            return value
        if isinstance(value, torch.Tensor):
            return value.device
    return None


class SyncGuard:
    """The process's one guard: ``SyncGuard.install()`` returns it (patching once); ``serving()`` marks a hook."""

    _installed: SyncGuard | None = None

    def __init__(self):
        self.hits: list[str] = []  # one label per blocking call made inside ``serving()``
        self.serving_group_calls = 0  # collectives on the default group, from any thread
        self._thread: threading.Thread | None = None  # the serving thread while inside ``serving()``

    @classmethod
    def install(cls) -> SyncGuard:
        if cls._installed is None:
            guard = cls()
            guard._patch()
            cls._installed = guard
        return cls._installed

    @contextmanager
    def serving(self):
        """Count blocking calls made by this thread until the block ends (one controller hook)."""
        self._thread = threading.current_thread()
        try:
            yield self
        finally:
            self._thread = None

    def _active(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _wrap(self, owner, name: str, label: str, when=None) -> None:
        original = getattr(owner, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            if self._active():
                self._thread = None  # what ``when`` itself calls is not the hook's
                try:
                    hit = when is None or when(*args, **kwargs)
                finally:
                    self._thread = threading.current_thread()
                if hit:
                    self.hits.append(label)
            return original(*args, **kwargs)

        try:
            setattr(owner, name, wrapper)
        except TypeError:  # a built-in type (torch.Event, torch.Stream): its Python subclasses are wrapped instead
            pass

    def _wrap_collective(self, name: str) -> None:
        original = getattr(dist, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            serving_group = kwargs.get("group") is None and not any(isinstance(a, dist.ProcessGroup) for a in args)
            if self._active() and not (kwargs.get("async_op") and not serving_group and _on_host(args, kwargs)):
                self.hits.append(f"dist.{name}")
            if serving_group:
                self.serving_group_calls += 1
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def _patch(self) -> None:
        tensor = torch.Tensor
        for name in _HOST_READS:
            self._wrap(tensor, name, f"Tensor.{name}")
        for name in ("as_tensor", "tensor"):
            self._wrap(torch, name, f"torch.{name}")
        for name in _DATA_SIZED:
            self._wrap(torch, name, f"torch.{name}")
            self._wrap(tensor, name, f"Tensor.{name}")
        self._wrap(torch, "where", "torch.where (one argument)", when=lambda *a, **k: len(a) + len(k) == 1)
        self._wrap(tensor, "__getitem__", "Tensor.__getitem__ (mask or host index)",
                   when=lambda t, index: _host_index(index))
        self._wrap(tensor, "__setitem__", "Tensor.__setitem__ (host value or index)",
                   when=lambda t, index, value: not isinstance(value, torch.Tensor) or _host_index(index))
        self._wrap(tensor, "to", "Tensor.to (blocking host copy)",
                   when=lambda t, *a, **k: _crosses_host(t, _to_target(a, k), k.get("non_blocking", False)))
        self._wrap(tensor, "copy_", "Tensor.copy_ (blocking host copy)",
                   when=lambda t, src, non_blocking=False: _crosses_host(src, t.device, non_blocking))
        self._wrap(dist.Work, "wait", "Work.wait (incomplete)", when=lambda work, *a, **k: not work.is_completed())
        for name in ("result", "exception"):
            self._wrap(concurrent.futures.Future, name, "waited for EPLB's side thread",
                       when=lambda future, *a, **k: not future.done())
        for owner in (torch.cuda.Event, torch.cuda.Stream, getattr(torch, "Event", None),
                      getattr(torch, "Stream", None)):
            if owner is not None:
                self._wrap(owner, "synchronize", f"{owner.__module__}.{owner.__name__}.synchronize")
        self._wrap(torch.cuda, "synchronize", "torch.cuda.synchronize")
        for name in _COLLECTIVES:
            self._wrap_collective(name)
