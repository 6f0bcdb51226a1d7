"""A small MoE transformer-style stack served with expert parallelism over a ``torch.distributed`` group.

Each block is ``h = x + dense(norm(x))`` (a token-local stand-in for attention) then ``h + moe(norm(h))``. The MoE
sub-layer of one rank, per step::

    gate (top-k, or DeepSeek-style grouped top-k)  -> logical expert ids [N, k] and weights [N, k]
    controller.route(layer, ids)                   -> physical slots [N, k] (the runtime's router; recorded there)
    all_to_all (counts, then token rows, then local slot ids) to the rank of each slot
    expert FFN of each local slot on the rows it received
    all_to_all back, then sum of the k weighted outputs in gate order, plus the optional shared expert

The k outputs of a token are summed in the same order whatever rank computed them, so a token's output does not
depend on the placement: the forward of a balanced model equals that of the same model without balancing.

Expert weights live per physical slot (``w13`` ``[K, 2F, D]`` and ``w2`` ``[K, D, F]`` per layer, this rank's ``K``
slots); the runtime's mover overwrites them in place when experts move. Every weight is generated from the seed, so
any rank can build the weights of any logical expert (:func:`expert_weights`).

Routing skew: the gate carries a per-expert selection bias (DeepSeek-V3's ``e_score_correction_bias`` plays this
role) calibrated at build time so that the share of tokens each expert receives follows a target popularity, by
default :func:`eplb.sim.traces.parametric_profile` (calibrated to DeepSeek-V3's skew).

Works on CPU with Gloo and unchanged on GPUs with NCCL: every tensor lives on ``device``; the only host syncs are
the split sizes of the all_to_all, which every expert-parallel engine needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from eplb.errors import EplbError

__all__ = ["ModelConfig", "MoEModel", "expert_weights", "grouped_topk"]

_CALIBRATION_TOKENS = 4096
_CALIBRATION_ROUNDS = 200
_MIN_GEMM_ROWS = 8


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model.

    Attributes:
        num_layers: L, MoE blocks.
        num_experts: E, routed experts per layer.
        top_k: experts per token.
        hidden: D, model width.
        ffn: F, width of each expert's FFN (and of the shared expert).
        num_groups: expert groups of the grouped top-k (1: plain top-k).
        topk_groups: groups a token may pick from (grouped top-k only).
        shared_expert: add a shared expert to every MoE block (computed on every rank for its own tokens).
        vocab: token ids are in ``[0, vocab)``.
        seed: every weight derives from it.
    """

    num_layers: int = 4
    num_experts: int = 16
    top_k: int = 4
    hidden: int = 64
    ffn: int = 128
    num_groups: int = 4
    topk_groups: int = 2
    shared_expert: bool = True
    vocab: int = 4096
    seed: int = 0

    def __post_init__(self):
        for name in ("num_layers", "num_experts", "top_k", "hidden", "ffn", "num_groups", "topk_groups", "vocab"):
            if getattr(self, name) < 1:
                raise EplbError(f"model {name} must be >= 1, got {getattr(self, name)}")
        if self.num_experts % self.num_groups:
            raise EplbError(f"model num_experts={self.num_experts} must be a multiple of num_groups={self.num_groups}")
        per_group = self.num_experts // self.num_groups
        if self.num_groups > 1 and not (self.topk_groups <= self.num_groups and self.top_k <= self.topk_groups * per_group):
            raise EplbError(f"grouped top-k needs topk_groups <= num_groups and top_k <= topk_groups x experts per "
                            f"group, got top_k={self.top_k}, topk_groups={self.topk_groups}, num_groups="
                            f"{self.num_groups}, {per_group} experts per group")
        if self.top_k > self.num_experts:
            raise EplbError(f"model top_k={self.top_k} exceeds num_experts={self.num_experts}")


def _generator(*key: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _normal(shape, scale: float, *key: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(*key)) * scale


def expert_weights(config: ModelConfig, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights of logical ``expert`` of ``layer`` on CPU: float32 ``w13`` ``[2F, D]`` (gate and up projections)
    and ``w2`` ``[D, F]``; the same on every rank and every call."""
    d, f = config.hidden, config.ffn
    return (_normal((2 * f, d), d ** -0.5, config.seed, 1, layer, expert),
            _normal((d, f), f ** -0.5, config.seed, 2, layer, expert))


def grouped_topk(scores: torch.Tensor, top_k: int, num_groups: int = 1, topk_groups: int = 1) -> torch.Tensor:
    """Top-k expert ids per token, DeepSeek-style when ``num_groups > 1``: a group scores the sum of its two best
    experts, each token keeps its ``topk_groups`` best groups and picks its ``top_k`` experts among them.

    Args:
        scores: float ``[N, E]`` selection scores.
    Returns:
        int64 ``[N, top_k]`` expert ids, best first.
    """
    if num_groups > 1:
        n, e = scores.shape
        grouped = scores.view(n, num_groups, e // num_groups)
        group_score = grouped.topk(min(2, e // num_groups), dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_score, dtype=torch.bool)
        keep.scatter_(1, group_score.topk(topk_groups, dim=-1).indices, True)
        scores = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(n, e)
    return scores.topk(top_k, dim=-1).indices


def _rms_norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    h = x @ w13.T
    gate, up = h.chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


def _expert_ffn(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """An expert's FFN on its rows, whose count depends on the placement: a few rows are padded with zeros because
    CPU GEMMs switch to another reduction order for very small M, and a token's result must not depend on how many
    other tokens its replica got."""
    n = x.shape[0]
    if n >= _MIN_GEMM_ROWS:
        return _ffn(x, w13, w2)
    return _ffn(torch.cat([x, x.new_zeros(_MIN_GEMM_ROWS - n, x.shape[1])]), w13, w2)[:n]


class MoEModel:
    """The model on one rank of the EP group.

    Args:
        config: the model's shape and seed.
        controller: this rank's :class:`eplb.runtime.EplbController` (any mode, ``off`` included); its placement at
            construction says which expert each local slot holds, and :meth:`moe` routes through it.
        expert_tensors: ``(w13, w2)`` from :meth:`allocate_experts`, the tensors given to the controller.
        popularity: float ``[L, E]`` target share of tokens per expert (rows sum to ``top_k``), or None for an
            unskewed gate. The gate bias is calibrated to it on the group's first rank and broadcast.
        gate_bias: the calibrated :attr:`gate_bias` of another instance of the same model, instead of
            ``popularity`` (skips the calibration).
        calibration_tokens: int64 ``[n]`` token ids the calibration routes (a sample of the workload); default:
            uniform over the vocabulary.
        group: the EP process group (None: the default group).
        device: where weights and activations live.
    """

    def __init__(self, config: ModelConfig, controller, expert_tensors, popularity: np.ndarray | None = None,
                 gate_bias=None, calibration_tokens: torch.Tensor | None = None, group=None, device="cpu"):
        self.config, self.ctl, self.group = config, controller, group
        self.device = torch.device(device)
        self.rank = controller.rank
        self.num_ranks = controller.topology.num_ranks
        self.slots_per_rank = controller.topology.slots_per_rank
        self.w13, self.w2 = expert_tensors
        self._members: torch.Tensor | None = None  # ranks of the group after a failure (None: all W)
        self._load_local_experts(controller.placement.phy2log)
        cfg, d = config, config.hidden
        to = dict(device=self.device)
        self.embed = _normal((cfg.vocab, d), 1.0, cfg.seed, 3).to(**to)
        self.dense = [_normal((d, d), d ** -0.5, cfg.seed, 4, layer).to(**to) for layer in range(cfg.num_layers)]
        self.gate = [_normal((cfg.num_experts, d), d ** -0.5, cfg.seed, 5, layer).to(**to)
                     for layer in range(cfg.num_layers)]
        self.shared = [(_normal((2 * cfg.ffn, d), d ** -0.5, cfg.seed, 6, layer).to(**to),
                        _normal((d, cfg.ffn), cfg.ffn ** -0.5, cfg.seed, 7, layer).to(**to))
                       if cfg.shared_expert else None for layer in range(cfg.num_layers)]
        #: float32 ``[E]`` per layer: the gate's selection bias
        self.gate_bias = [torch.zeros(cfg.num_experts, **to) for _ in range(cfg.num_layers)]
        if gate_bias is not None:
            self.gate_bias = [b.clone().to(**to) for b in gate_bias]
        elif popularity is not None:
            self._calibrate_on_first_rank(np.asarray(popularity, dtype=np.float64), calibration_tokens)
        #: int64 [L]: rows (token x expert pairs) this rank's experts computed in the last forward, per layer
        self.last_received = torch.zeros(cfg.num_layers, dtype=torch.int64)
        #: CPU seconds (``time.thread_time``) this rank spent in its experts' FFNs in the last forward; unlike wall
        #: clock it does not grow when other processes share the CPU (meaningful on CPU devices only)
        self.last_expert_cpu_s = 0.0

    # -- weights ------------------------------------------------------------------------------------------------
    @staticmethod
    def allocate_experts(config: ModelConfig, slots_per_rank: int, device="cpu") -> tuple[list, list]:
        """Empty per-slot expert tensors: ``w13[l]`` float32 ``[K, 2F, D]`` and ``w2[l]`` ``[K, D, F]`` per layer.

        Hand them to the controller (``layer_tensors=[[w13[l], w2[l]] for l in range(L)]``) and then to the model,
        which fills them in place from the controller's placement."""
        d, f, k = config.hidden, config.ffn, slots_per_rank
        w13 = [torch.empty(k, 2 * f, d, device=device) for _ in range(config.num_layers)]
        w2 = [torch.empty(k, d, f, device=device) for _ in range(config.num_layers)]
        return w13, w2

    def _load_local_experts(self, phy2log: np.ndarray) -> None:
        k = self.slots_per_rank
        for layer in range(self.config.num_layers):
            for slot, expert in enumerate(phy2log[layer, self.rank * k:(self.rank + 1) * k].tolist()):
                w13, w2 = expert_weights(self.config, layer, expert)
                self.w13[layer][slot].copy_(w13)
                self.w2[layer][slot].copy_(w2)

    def use_group(self, group, live_ranks) -> None:
        """Serve over ``group``, the survivors' process group (the live ranks in rank order), after a failure; the
        controller's :meth:`~eplb.runtime.EplbController.fail_ranks` keeps every route off the failed ranks."""
        self.group = group
        self._members = torch.as_tensor(np.flatnonzero(np.asarray(live_ranks, dtype=bool)), device=self.device)

    # -- gate ---------------------------------------------------------------------------------------------------
    def route_logical(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate of ``layer`` on normalised rows ``x`` float32 ``[N, D]``: int64 ids ``[N, k]`` and float32 weights
        ``[N, k]`` (sigmoid scores of the picked experts, normalised per token). The bias steers selection only."""
        scores = torch.sigmoid(x @ self.gate[layer].T)
        ids = grouped_topk(scores + self.gate_bias[layer], self.config.top_k, self.config.num_groups,
                           self.config.topk_groups)
        weights = scores.gather(1, ids)
        return ids, weights / weights.sum(-1, keepdim=True)

    def _calibrate_on_first_rank(self, popularity: np.ndarray, tokens: torch.Tensor | None) -> None:
        """Calibrate on the group's first rank and broadcast: every rank gets the same bias, whatever its device."""
        if self.rank == 0:
            self._calibrate(popularity, tokens)
        first = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for bias in self.gate_bias:
            dist.broadcast(bias, src=first, group=self.group)

    def _calibrate(self, popularity: np.ndarray, tokens: torch.Tensor | None) -> None:
        """Fit each layer's selection bias so expert ``e`` gets a share ``popularity[l, e] / top_k`` of the
        routings of the sample ``tokens``, layer after layer on the sample's real hidden states (dense, local)."""
        cfg = self.config
        if popularity.shape != (cfg.num_layers, cfg.num_experts):
            raise EplbError(f"popularity has shape {popularity.shape}, expected [L={cfg.num_layers}, "
                            f"E={cfg.num_experts}]")
        target = torch.as_tensor(popularity / popularity.sum(1, keepdims=True), dtype=torch.float32)
        if tokens is None:
            tokens = torch.randint(0, cfg.vocab, (_CALIBRATION_TOKENS,), generator=_generator(cfg.seed, 8))
        h = self.embed[tokens.to(self.device)]
        for layer in range(cfg.num_layers):
            h = h + self._dense(layer, h)
            x = _rms_norm(h)
            scores = torch.sigmoid(x @ self.gate[layer].T)
            bias = torch.zeros(cfg.num_experts, device=self.device)
            goal = target[layer].to(self.device)
            for _ in range(_CALIBRATION_ROUNDS):
                ids = grouped_topk(scores + bias, cfg.top_k, cfg.num_groups, cfg.topk_groups)
                share = torch.bincount(ids.reshape(-1), minlength=cfg.num_experts).float() / ids.numel()
                bias += 0.05 * (torch.log(goal) - torch.log(share.clamp_min(0.5 / ids.numel())))
            self.gate_bias[layer] = bias - bias.mean()
            h = h + self._dense_moe(layer, x)

    # -- forward ------------------------------------------------------------------------------------------------
    def _dense(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(_rms_norm(h) @ self.dense[layer].T)

    def _shared(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        shared = self.shared[layer]
        return None if shared is None else _ffn(x, *shared)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, D]`` embeddings of int64 token ids ``[N]``."""
        return self.embed[tokens.to(self.device)]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Expert-parallel forward of this rank's tokens (int64 ``[N]``); every rank of the group must call it in
        the same step (``N`` may differ per rank, 0 included). Returns float32 ``[N, D]``."""
        h = self.embed_tokens(tokens)
        self.last_expert_cpu_s = 0.0
        for layer in range(self.config.num_layers):
            h = h + self._dense(layer, h)
            h = h + self.moe(layer, _rms_norm(h))
        return h

    def moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE sub-layer over the EP group for normalised rows ``x`` float32 ``[N, D]`` -> ``[N, D]``."""
        n, d = x.shape
        top_k, k_slots = self.config.top_k, self.slots_per_rank
        ids, weights = self.route_logical(layer, x)
        slots = self.ctl.route(layer, ids).reshape(-1)  # [N * k] physical slots
        dest = torch.div(slots, k_slots, rounding_mode="floor")
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=self.num_ranks)
        if self._members is not None:  # no route names a failed rank: their counts are 0
            send_counts = send_counts[self._members]
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts)
        send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
        received = sum(recv_sizes)
        send_rows = x.repeat_interleave(top_k, dim=0)[order]
        recv_rows = x.new_empty(received, d)
        self._all_to_all(recv_rows, send_rows, recv_sizes, send_sizes)
        recv_slots = slots.new_empty(received)
        self._all_to_all(recv_slots, (slots % k_slots)[order], recv_sizes, send_sizes)
        start = time.thread_time()
        out_rows = self._local_experts(layer, recv_rows, recv_slots)
        self.last_expert_cpu_s += time.thread_time() - start
        back = x.new_empty(n * top_k, d)
        self._all_to_all(back, out_rows, send_sizes, recv_sizes)
        per_choice = torch.empty_like(back)
        per_choice[order] = back
        self.last_received[layer] = received
        out = (per_choice.view(n, top_k, d) * weights.unsqueeze(-1)).sum(1)
        shared = self._shared(layer, x)
        return out if shared is None else out + shared

    def _all_to_all(self, output, input, output_sizes=None, input_sizes=None) -> None:
        work = dist.all_to_all_single(output, input, output_sizes, input_sizes, group=self.group, async_op=True)
        self.wait(work)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """``tensor`` reduced in place over the serving group (waited like the forward's collectives)."""
        self.wait(dist.all_reduce(tensor, op=op, group=self.group, async_op=True))
        return tensor

    def wait(self, work) -> None:
        """Wait for a collective of the serving group: through the controller's heartbeat when it has one, so a
        collective with a hung rank raises :class:`eplb.runtime.heartbeat.RankFailure` once the rank is declared
        failed instead of hanging until the group's timeout."""
        heartbeat = self.ctl.heartbeat
        if heartbeat is not None:
            heartbeat.wait(work)
        else:
            work.wait()

    def _local_experts(self, layer: int, rows: torch.Tensor, local_slots: torch.Tensor) -> torch.Tensor:
        """FFN of each local slot on the rows sent to it (rows grouped by slot, outputs in the input order)."""
        order = torch.argsort(local_slots, stable=True)
        counts = torch.bincount(local_slots, minlength=self.slots_per_rank).tolist()
        out = torch.empty_like(rows)
        start = 0
        for slot, count in enumerate(counts):
            if count:
                index = order[start:start + count]
                out[index] = _expert_ffn(rows[index], self.w13[layer][slot], self.w2[layer][slot])
                start += count
        return out

    # -- reference ----------------------------------------------------------------------------------------------
    def _dense_moe(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE sub-layer computed locally with every logical expert (no EP, no runtime)."""
        ids, weights = self.route_logical(layer, x)
        n, top_k = ids.shape
        flat = ids.reshape(-1)
        rows = x.repeat_interleave(top_k, dim=0)
        per_choice = torch.empty_like(rows)
        for expert in torch.unique(flat).tolist():
            index = (flat == expert).nonzero().reshape(-1)
            w13, w2 = expert_weights(self.config, layer, expert)
            per_choice[index] = _expert_ffn(rows[index], w13.to(self.device), w2.to(self.device))
        out = (per_choice.view(n, top_k, -1) * weights.unsqueeze(-1)).sum(1)
        shared = self._shared(layer, x)
        return out if shared is None else out + shared

    def dense_forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The same model computed on this rank alone with all experts (no collectives): float32 ``[N, D]``."""
        h = self.embed_tokens(tokens)
        for layer in range(self.config.num_layers):
            h = h + self._dense(layer, h)
            h = h + self._dense_moe(layer, _rms_norm(h))
        return h
