"""What one device check runs: :class:`CheckSettings`, and the device it runs on, refused before anything starts
when the runtime cannot use it (:func:`resolve_device`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from eplb.errors import DeviceCheckError

__all__ = ["CheckSettings", "DeviceCheckError", "resolve_device", "DISPATCH_RULES", "EXPERT_DTYPES"]

#: the runtime's dispatch rules, each served in turn (``balanced`` with the group's tokens per expert)
DISPATCH_RULES = ("rank", "token", "local", "balanced")
#: dtypes an expert tensor of the check may have (weights, quantised weights, scales)
EXPERT_DTYPES = ("float32", "bfloat16", "float16", "int8", "uint8", "float8_e4m3fn", "float8_e5m2")
_MAX_RANKS = 8
#: how a rank fails on purpose (:attr:`CheckSettings.fault`)
FAULTS = ("raise", "exit", "hang")

@dataclass(frozen=True)
class CheckSettings:
    """One run of the device check. The defaults are DeepSeek-V3's tables (58 MoE layers, 256 experts, 2 ranks x 160
    slots, top-8); on CPU the experts and the forward are small so that the run takes about a minute.

    Attributes:
        device: ``cpu`` or ``cuda:N`` (:func:`resolve_device`); every rank serves on it.
        ranks: ranks of the EP group, all on ``device`` (Gloo serving and transfer groups).
        cycles: rebalancing cycles served per dispatch rule; the load profile changes every cycle, so each moves
            layers, and a cycle goes through every step kind (window end, planner polls and checks, moves, switches).
        budget_s: wall-clock budget of all dispatch rules together; a mode past its share stops, on an agreed step,
            and fails the check.
        margin_s: what the launch may take beyond ``budget_s`` (start-up, closing, graphs) before it kills the
            ranks still running (a hang).
        expert_bytes: bytes of one expert's first tensor; ``expert_dtypes[1:]`` get ``expert_bytes // 256`` each
            (scales).
        expert_dtypes: the dtypes of each expert's tensors; all move together, compared byte for byte at the end.
        tokens, hidden: tokens per rank and step, width of the stand-in forward (one ``[tokens, hidden] x [hidden,
            hidden]`` matmul per layer).
        fault: tests only, ``(rank, how)``: that rank fails on purpose, to prove that the check still reports:
            ``raise`` (an exception) or ``exit`` (the process dies) in its first move step, ``hang`` (it never
            returns; the launch times out and the result carries the rank's stacks) in its first step.
    """

    device: str = "cpu"
    ranks: int = 2
    layers: int = 58
    experts: int = 256
    slots: int = 320  # over all ranks
    top_k: int = 8
    cycles: int = 3
    window_steps: int = 8
    layers_per_step: int = 4
    budget_s: float = 400.0
    margin_s: float = 120.0
    expert_bytes: int = 8 * 1024
    expert_dtypes: tuple[str, ...] = ("bfloat16", "uint8")
    tokens: int = 64
    hidden: int = 128
    modes: tuple[str, ...] = DISPATCH_RULES
    fault: tuple[int, str] | None = None
    seed: int = 0

    def __post_init__(self):
        def need(ok: bool, name: str, value, expected: str):
            if not ok:
                raise DeviceCheckError(f"{name} must be {expected}, got {value!r}")

        need(isinstance(self.ranks, int) and 2 <= self.ranks <= _MAX_RANKS, "ranks", self.ranks,
             f"an integer from 2 to {_MAX_RANKS} (every rank serves on the one device)")
        for name in ("layers", "experts", "top_k", "cycles", "window_steps", "layers_per_step", "tokens", "hidden"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        need(self.cycles >= 2, "cycles", self.cycles, ">= 2 (the first cycle warms the planner up)")
        need(self.slots_per_rank * self.ranks >= self.experts, "slots", self.slots,
             f">= experts ({self.experts})")
        need(self.top_k <= self.experts, "top_k", self.top_k, f"<= experts ({self.experts})")
        need(self.budget_s > 0, "budget_s", self.budget_s, "> 0 seconds")
        need(self.margin_s > 0, "margin_s", self.margin_s, "> 0 seconds")
        need(isinstance(self.expert_bytes, int) and self.expert_bytes >= 512 and self.expert_bytes % 512 == 0,
             "expert_bytes", self.expert_bytes, "a multiple of 512 bytes, at least 512")
        need(len(self.expert_dtypes) >= 1 and all(d in EXPERT_DTYPES for d in self.expert_dtypes),
             "expert_dtypes", self.expert_dtypes, f"names from {', '.join(EXPERT_DTYPES)}")
        need(len(self.modes) >= 1 and all(m in DISPATCH_RULES for m in self.modes), "modes", self.modes,
             f"names from {', '.join(DISPATCH_RULES)}")
        need(self.fault is None or (len(self.fault) == 2 and 0 <= self.fault[0] < self.ranks
                                    and self.fault[1] in FAULTS), "fault", self.fault,
             f"None or (rank in 0..{self.ranks - 1}, one of {', '.join(FAULTS)})")

    @property
    def slots_per_rank(self) -> int:
        return math.ceil(self.slots / self.ranks)

    @property
    def launch_timeout_s(self) -> float:
        """When the launch gives up and kills the ranks still running."""
        return self.budget_s + self.margin_s

    @classmethod
    def for_device(cls, device: str, **changes) -> CheckSettings:
        """The settings for ``device`` (a :func:`resolve_device` name): on CUDA 2 MiB experts and a forward that
        takes milliseconds, so transfers overlap forwards as in serving; ``changes`` override any field."""
        sizes = {}
        if device.startswith("cuda"):
            sizes = dict(expert_bytes=2 * 2**20, tokens=256, hidden=2048, budget_s=240.0, layers_per_step=1)
        return cls(device=device, **{**sizes, **changes})


def resolve_device(name: str | None) -> str:
    """The device the check runs on, as ``cpu`` or ``cuda:N``; ``None`` picks CUDA when a device is visible.

    Raises:
        DeviceCheckError: a name that is not ``cpu``, ``cuda`` or ``cuda:N``; CUDA asked for and this torch has no
            CUDA or sees no device; an index out of range.
    """
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    text = str(name).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise DeviceCheckError(f"device {name!r} is not one the runtime can check: expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return "cpu"
    if not torch.backends.cuda.is_built():
        raise DeviceCheckError(f"device {name!r}: this torch ({torch.__version__}) is built without CUDA; use "
                               "--device cpu, or install a CUDA build of torch")
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceCheckError(f"device {name!r}: torch sees no CUDA device (CUDA_VISIBLE_DEVICES, driver); use "
                               "--device cpu to check the runtime's logic without one")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise DeviceCheckError(f"device {name!r}: CUDA devices are 0..{count - 1}")
    return f"cuda:{index}"
