"""Catch, on CPU, the host syncs the serving thread would make on an accelerator.

The sync-free contract says that EPLB's hooks (``before_forward``, ``route``, ``after_forward``) never make the
serving thread wait. CUDA's sync debug mode catches some violations on a GPU; this guard catches them on any device,
CPU included, by wrapping the entry points that block. Inside ``with guard.serving():`` on the thread that entered
it, each call to one of them is recorded in :attr:`SyncGuard.hits`:

- a host read of a tensor: ``Tensor.item``, ``.cpu``, ``.tolist``, ``.numpy``, ``__bool__``;
- a tensor built from host data (``torch.as_tensor``, ``torch.tensor``): on a device, a blocking upload;
- ``Work.wait`` on work not yet complete, and reading a side-thread result that is not ready (``Future.result``);
- any collective or point-to-point call.

From any thread, a collective on the default group (the serving group) counts in
:attr:`SyncGuard.serving_group_calls`: EPLB's traffic runs on groups of its own.

Installing patches ``torch``, ``torch.distributed`` and ``concurrent.futures`` for the whole process and cannot be
undone: use it in a process of its own (the contract test, ``benchmarks/gpu_check.py``, ``eplb doctor``).
"""

from __future__ import annotations

import concurrent.futures
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

__all__ = ["SyncGuard"]

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "barrier",
                "reduce_scatter_tensor", "all_to_all_single", "isend", "irecv", "send", "recv", "batch_isend_irecv")


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
            if self._active() and (when is None or when(*args, **kwargs)):
                self.hits.append(label)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    def _wrap_collective(self, name: str) -> None:
        original = getattr(dist, name, None)
        if original is None:
            return

        def wrapper(*args, **kwargs):
            if self._active():
                self.hits.append(f"dist.{name}")
            if kwargs.get("group") is None and not any(isinstance(a, dist.ProcessGroup) for a in args):
                self.serving_group_calls += 1
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def _patch(self) -> None:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__"):
            self._wrap(torch.Tensor, name, f"Tensor.{name}")
        for name in ("as_tensor", "tensor"):
            self._wrap(torch, name, f"torch.{name}")
        self._wrap(dist.Work, "wait", "Work.wait (incomplete)", when=lambda work, *a, **k: not work.is_completed())
        self._wrap(concurrent.futures.Future, "result", "waited for EPLB's side thread",
                   when=lambda future, *a, **k: not future.done())
        for name in _COLLECTIVES:
            self._wrap_collective(name)
