"""What several commands share: help layout, checks of the user's flags (named as typed), the output file, the memory
a run needs, and the cluster shape built from ``--ranks / --slots-per-rank / --redundant / --nodes / --groups``.

Checks here run before any long work, so that a typo costs nothing and nothing is half-written.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from eplb.errors import EplbError

# Map formats told by the output's suffix. A .json map is written for vllm-ascend (its expert-map file); SGLang
# reads JSON too: say --format sglang for it.
MAP_FORMAT_BY_SUFFIX = {".json": "ascend", ".npy": "vllm", ".pt": "vllm", ".pth": "vllm", ".yaml": "trtllm",
                        ".yml": "trtllm"}
LOAD_FORMAT_BY_SUFFIX = {".npz": "npz", ".json": "sglang", ".pt": "sglang", ".pth": "sglang"}

# The same --nodes / --groups defaults and help in every command that plans: a single node and plain (ungrouped)
# experts unless told, so that the same load and flags give the same plan in plan and simulate.
NODES_HELP = "nodes the ranks are spread over, for hierarchical policies (default: 1)"
GROUPS_HELP = "expert groups of the model, for DeepSeek's hierarchical policy (default: 1; DeepSeek-V3: 8)"


def add_cluster_arguments(parser, default_slots: int):
    """The cluster flags of the commands that simulate: ``--ranks``, ``--slots-per-rank`` or ``--redundant``,
    ``--nodes``, ``--groups``; returns their argument group."""
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--ranks", type=int, default=32, metavar="W", help="ranks (EP size)")
    slots = cluster.add_mutually_exclusive_group()
    slots.add_argument("--slots-per-rank", type=int, metavar="K",
                       help=f"expert slots per rank (default: {default_slots})")
    slots.add_argument("--redundant", type=int, metavar="R", help="redundant slots in all: K = (E + R) / W")
    cluster.add_argument("--nodes", type=int, default=1, metavar="N", help=NODES_HELP)
    cluster.add_argument("--groups", type=int, default=1, metavar="G", help=GROUPS_HELP)
    return cluster


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` once: not for options without a default, nor when the help already says it."""

    def _get_help_string(self, action):
        help = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "(default" in help:
            return help
        return super()._get_help_string(action)


#: optional packages each command needs, checked before it starts: (module, the option that needs it or None for
#: the command itself, what needs it in the message)
NEEDS = {
    "demo": (("torch", None, "eplb demo"),),
    "doctor": (("torch", None, "eplb doctor"),),
    "eval": (("matplotlib", "plot", "--plot"),),
    "simulate": (("matplotlib", None, "eplb simulate (the report's plots)"),),
}


def check_extras(args) -> None:
    """Refuse ``args.command`` before any work when an optional package it needs is missing: one line naming the
    extra that installs it (``pip install "eplb[torch]"``)."""
    from eplb._extras import require

    for module, option, what in NEEDS.get(args.command, ()):
        if option is None or getattr(args, option, None):
            require(module, what)


def at_least(flag: str, value, minimum=1) -> None:
    """Raise unless ``value`` (when given) is >= ``minimum``, naming the flag as the user typed it."""
    if value is not None and not value >= minimum:
        raise EplbError(f"{flag} must be >= {minimum}, got {value}")


def within(flag: str, value, low: float, high: float) -> None:
    """Raise unless ``value`` (when given) lies in ``[low, high]``."""
    if value is not None and not low <= value <= high:
        raise EplbError(f"{flag} must be within [{low:g}, {high:g}], got {value:g}")


def check_output(path, flag: str) -> None:
    """Raise now when ``path`` cannot be written (missing folder, a folder in the way, no permission)."""
    from eplb._files import check_writable

    check_writable(path, flag)


def format_from_suffix(path, flag: str, table: dict[str, str], format_flag: str, choices) -> str:
    """The format an output file's suffix names; raises naming ``format_flag`` when the suffix says nothing."""
    suffix = Path(path).suffix.lower()
    if suffix not in table:
        known = ", ".join(f"{s} {f}" for s, f in table.items())
        raise EplbError(f"{flag} {path}: cannot tell the format from the suffix {suffix or '(none)'!r} ({known}); "
                        f"pass {format_flag} ({', '.join(choices)})")
    return table[suffix]


def available_memory() -> int:
    """Bytes this process can allocate without swapping or meeting the OOM killer: MemAvailable, else physical
    memory; less when this process's cgroup (a container) has a lower memory limit."""
    free = _system_free_bytes()
    limited = _cgroup_free_bytes()
    return free if limited is None else min(free, limited)


def _system_free_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


# (limit, usage, statistics, reclaimable page cache key) of cgroup v2 and v1
_CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat",
                   "inactive_file"),
                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                   "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"))


def _cgroup_free_bytes() -> int | None:
    """The cgroup memory limit less what the group uses (its reclaimable page cache not counted); None without one."""
    for limit_path, usage_path, stat_path, cache_key in _CGROUP_MEMORY:
        try:
            limit_text = Path(limit_path).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**60:  # v1 writes "no limit" as a huge number
                return None
            usage = int(Path(usage_path).read_text())
            stats = dict(line.split() for line in Path(stat_path).read_text().splitlines() if line.count(" ") == 1)
            return max(0, int(limit_text) - usage + int(stats.get(cache_key, 0)))
        except (OSError, ValueError):
            continue
    return None


def check_memory(needed_bytes: float, what: str, change: str) -> None:
    """Refuse a run whose estimated memory exceeds what is available, with the estimate and the flags to change."""
    free = available_memory()
    if needed_bytes > free:
        raise EplbError(f"{what} needs about {_gib(needed_bytes)} of memory, but {_gib(free)} is available; "
                        f"{change}")


def _gib(size: float) -> str:
    return f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.0f} MiB"


def topology(args, num_experts: int, default_slots: int | None = None):
    """The :class:`~eplb.Topology` of ``--ranks``, ``--slots-per-rank`` or ``--redundant``, ``--nodes``, ``--groups``
    for ``num_experts`` experts; every error names the flags."""
    from eplb.topology import Topology

    at_least("--ranks", args.ranks)
    at_least("--nodes", args.nodes)
    at_least("--groups", args.groups)
    nodes, groups = args.nodes, args.groups
    if args.redundant is not None:
        at_least("--redundant", args.redundant, 0)
        total = num_experts + args.redundant
        if total % args.ranks:
            raise EplbError(f"--redundant {args.redundant}: {num_experts} experts + {args.redundant} redundant = "
                            f"{total} slots do not split evenly over --ranks {args.ranks}; pick R so that "
                            f"{args.ranks} divides {num_experts} + R (e.g. {-num_experts % args.ranks})")
        slots = total // args.ranks
    else:
        slots = args.slots_per_rank if args.slots_per_rank is not None else default_slots
        if slots is None:
            raise EplbError("give --slots-per-rank K or --redundant R")
        at_least("--slots-per-rank", slots)
    if args.ranks % nodes:
        raise EplbError(f"--nodes {nodes} does not divide --ranks {args.ranks}; every node holds the same number of "
                        "ranks")
    if num_experts % groups:
        raise EplbError(f"--groups {groups} does not divide the {num_experts} experts; every group holds the same "
                        "number of experts")
    if args.ranks * slots < num_experts:
        need = math.ceil(num_experts / args.ranks)
        raise EplbError(f"--ranks {args.ranks} x --slots-per-rank {slots} = {args.ranks * slots} slots cannot hold "
                        f"the {num_experts} experts; every expert needs a slot (--slots-per-rank >= {need})")
    return Topology(args.ranks, slots, nodes, groups)


def stderr_console():
    """The rich console for progress: stderr, so that stdout stays the result."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def spinner(text: str, quiet: bool = False):
    """A spinner on stderr while slow work runs (kernels compiling on first use); nothing when ``quiet`` or when
    stderr is not a terminal."""
    from contextlib import nullcontext

    console = stderr_console()
    if quiet or not console.is_terminal:
        return nullcontext()
    return console.status(text, spinner="dots")
