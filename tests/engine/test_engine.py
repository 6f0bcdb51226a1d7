"""The engine's parts in this process (a 1-rank Gloo group), and the rank launcher's failure handling."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("compiled_auto")  # the runtime's default policy, compiled once
import torch.distributed as dist  # noqa: E402

from eplb import EplbError, Placement, Topology  # noqa: E402
from eplb.engine.launch import LaunchError, launch  # noqa: E402
from eplb.engine.model import ModelConfig, MoEModel, expert_weights, grouped_topk  # noqa: E402
from eplb.engine.tokens import SkewedTokens, expert_popularity  # noqa: E402
from eplb.metrics import par, rank_loads  # noqa: E402
from eplb.sim.traces import parametric_profile  # noqa: E402

SMALL = ModelConfig(num_layers=2, num_experts=8, top_k=2, hidden=16, ffn=32, num_groups=4, topk_groups=2, vocab=64)


# -- gate ---------------------------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 3)]), st.integers(1, 4), st.integers(0, 99))
def test_grouped_topk_picks_distinct_experts_from_the_best_groups(tokens, groups, top_k, seed):
    num_groups, topk_groups = groups
    per_group = 16 // num_groups
    top_k = min(top_k, topk_groups * per_group)
    scores = torch.rand(tokens, 16, generator=torch.Generator().manual_seed(seed))
    ids = grouped_topk(scores, top_k, num_groups, topk_groups)
    assert ids.shape == (tokens, top_k)
    assert all(len(set(row)) == top_k for row in ids.tolist())
    group_score = scores.view(tokens, num_groups, per_group).topk(min(2, per_group), -1).values.sum(-1)
    best_groups = group_score.topk(topk_groups, -1).indices
    for row, kept in zip(ids.tolist(), best_groups.tolist()):
        assert {e // per_group for e in row} <= set(kept)
    if num_groups == 1:
        assert torch.equal(ids, scores.topk(top_k, -1).indices)


def test_model_config_rejects_bad_shapes():
    with pytest.raises(EplbError, match="multiple of num_groups"):
        ModelConfig(num_experts=10, num_groups=4)
    with pytest.raises(EplbError, match="top_k"):
        ModelConfig(num_experts=16, top_k=9, num_groups=4, topk_groups=2)
    with pytest.raises(EplbError, match="hidden"):
        ModelConfig(hidden=0)


def test_expert_weights_depend_only_on_seed_layer_and_expert():
    a, b = expert_weights(SMALL, 1, 3), expert_weights(SMALL, 1, 3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (2 * SMALL.ffn, SMALL.hidden) and a[1].shape == (SMALL.hidden, SMALL.ffn)
    assert not torch.equal(a[0], expert_weights(SMALL, 1, 4)[0])
    assert not torch.equal(a[0], expert_weights(SMALL, 0, 3)[0])


# -- workload ------------------------------------------------------------------------------------------------------
def test_skewed_tokens_are_reproducible_per_step_and_rank():
    tokens = SkewedTokens(vocab=100, tokens_per_rank=50, seed=3)
    batch = tokens.batch(5, 1)
    assert batch.dtype == torch.int64 and batch.shape == (50,)
    assert torch.equal(batch, SkewedTokens(vocab=100, tokens_per_rank=50, seed=3).batch(5, 1))
    assert not torch.equal(batch, tokens.batch(5, 2)) and not torch.equal(batch, tokens.batch(6, 1))
    assert int(batch.min()) >= 0 and int(batch.max()) < 100
    with pytest.raises(EplbError, match="tokens_per_rank"):
        SkewedTokens(vocab=10, tokens_per_rank=0)


def test_expert_popularity_from_the_profile_or_a_trace():
    assert np.array_equal(expert_popularity(3, 16, 4, seed=2), parametric_profile(3, 16, 2, top_k=4))
    trace = np.random.default_rng(0).integers(0, 50, (7, 3, 16))
    popularity = expert_popularity(3, 16, 4, trace=trace)
    assert popularity.shape == (3, 16) and np.allclose(popularity.sum(axis=1), 4)
    assert np.argmax(popularity[1]) == np.argmax(trace.sum(axis=0)[1])
    with pytest.raises(EplbError, match="L=3 layers x E=8"):
        expert_popularity(3, 8, 4, trace=trace)


# -- the model on a 1-rank group ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("store") / "pg"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(config: ModelConfig, slots: int, popularity=None, placement=None, calibration=None) -> MoEModel:
    from eplb.runtime import EplbConfig, EplbController

    topology = Topology(1, slots)
    w13, w2 = MoEModel.allocate_experts(config, slots)
    ctl = EplbController(EplbConfig.from_dict({"mode": "off"}), config.num_layers, config.num_experts, topology, 0,
                         layer_tensors=[[w13[l], w2[l]] for l in range(config.num_layers)], placement=placement)
    return MoEModel(config, ctl, (w13, w2), popularity, calibration_tokens=calibration)


@pytest.mark.slow
def test_forward_equals_the_dense_model_with_replicas_in_any_slot(one_rank_group):
    popularity = expert_popularity(SMALL.num_layers, SMALL.num_experts, SMALL.top_k)
    plain = _model(SMALL, 8, popularity)
    # hot experts replicated, slots shuffled: the weights of every slot follow the placement
    row = np.array([5, 0, 7, 1, 6, 2, 5, 3, 0, 4, 7])
    replicated = _model(SMALL, 11, placement=Placement(np.tile(row, (2, 1)), 8, Topology(1, 11)))
    replicated.gate_bias = plain.gate_bias
    for slot, expert in enumerate(row.tolist()):
        assert torch.equal(replicated.w13[1][slot], expert_weights(SMALL, 1, expert)[0])
    tokens = SkewedTokens(SMALL.vocab, 40, seed=1).batch(0, 0)
    out = plain.forward(tokens)
    assert out.shape == (40, SMALL.hidden) and out.dtype == torch.float32
    assert torch.equal(out, plain.dense_forward(tokens))
    assert torch.equal(replicated.forward(tokens), out)
    assert int(replicated.last_received.sum()) == 40 * SMALL.top_k * SMALL.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("num_groups", [1, 4])
def test_gate_bias_reproduces_the_target_skew(one_rank_group, num_groups):
    config = ModelConfig(num_layers=1, num_experts=16, top_k=4, hidden=32, ffn=16, num_groups=num_groups)
    popularity = expert_popularity(1, 16, 4, seed=5)
    model = _model(config, 16, popularity, calibration=SkewedTokens(config.vocab, 4096, seed=8).batch(0, 0))
    x = model.embed_tokens(SkewedTokens(config.vocab, 4096, seed=9).batch(0, 0))  # another sample
    x = x + model._dense(0, x)  # the MoE layer's input, as in forward
    ids, _ = model.route_logical(0, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    share = np.bincount(ids.reshape(-1).numpy(), minlength=16) / ids.numel()
    target = popularity[0] / popularity[0].sum()
    topology = Topology(4, 4)  # the skew a 4-rank EP group sees on vLLM's initial layout
    got = par(rank_loads(Placement.initial(16, topology), share[None]))[0]
    want = par(rank_loads(Placement.initial(16, topology), target[None]))[0]
    if num_groups == 1:
        assert np.abs(share - target).max() < 0.03
        assert got == pytest.approx(want, rel=0.05)
    else:  # a token reaches only 2 of 4 groups: the hottest expert (95% of tokens here) cannot be fully matched
        assert np.abs(share - target).max() < 0.06
        assert got > 1.3 and got == pytest.approx(want, rel=0.2)


# -- launcher ------------------------------------------------------------------------------------------------------
def _fails_on_rank_one(rank, world, emit):
    emit(("hello", rank))
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # rank 0 would wait forever: the launcher must kill it
    return rank


def _sleeps(rank, world, emit):
    time.sleep(600)


@pytest.mark.dist
@pytest.mark.slow
def test_launch_reports_a_failing_rank_and_stops_the_others():
    events = []
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 failed(.|\n)*rank one is broken"):
        launch(_fails_on_rank_one, 2, timeout_s=90, on_event=lambda r, p: events.append(p))
    assert time.monotonic() - start < 90
    assert ("hello", 1) in events


@pytest.mark.dist
@pytest.mark.slow
def test_launch_gives_up_after_its_timeout():
    start = time.monotonic()
    with pytest.raises(LaunchError, match="did not finish within 3 s"):
        launch(_sleeps, 2, timeout_s=3)
    assert time.monotonic() - start < 30
