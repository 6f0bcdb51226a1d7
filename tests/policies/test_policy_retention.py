"""Rank relabelling (``match_ranks``): the sparse matching is as good as a dense assignment by its own score."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from eplb.policies.shared.retention import match_ranks, rank_overlap, unit_permutation


def dense_overlap(new_row: np.ndarray, old_row: np.ndarray, num_ranks: int) -> np.ndarray:
    """``[i, j]`` = experts (with multiplicity) new rank ``i`` and old rank ``j`` share, by a plain loop."""
    new_t, old_t = new_row.reshape(num_ranks, -1), old_row.reshape(num_ranks, -1)
    out = np.zeros((num_ranks, num_ranks), dtype=np.int64)
    for i in range(num_ranks):
        for j in range(num_ranks):
            rest = list(old_t[j])
            for e in new_t[i]:
                if e in rest:
                    rest.remove(e)
                    out[i, j] += 1
    return out


@st.composite
def relabellings(draw):
    num_ranks = draw(st.integers(1, 9))
    slots = draw(st.integers(1, 4))
    num_experts = draw(st.integers(1, num_ranks * slots))
    block = draw(st.sampled_from([b for b in range(1, num_ranks + 1) if num_ranks % b == 0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    row = np.arange(num_ranks * slots) % num_experts
    old = np.stack([rng.permutation(row) for _ in range(2)])
    new = np.stack([rng.permutation(row) for _ in range(2)])
    kept = draw(st.integers(0, num_ranks * slots))  # a re-plan keeps most of the old layout
    new[:, :kept] = old[:, :kept]
    return new, old, num_ranks, block


@settings(max_examples=300, deadline=None)
@given(relabellings(), st.sampled_from([0, 256]))
def test_the_matching_scores_as_high_as_a_dense_assignment(case, dense_up_to):
    """Both ways of relabelling (the sparse matching, forced here on small cases, and the dense assignment) reach
    the dense assignment's score, computed here from a plain-loop overlap."""
    new, old, num_ranks, block = case
    source = unit_permutation(new, old, num_ranks, block, dense_up_to)
    for layer in range(new.shape[0]):
        assert sorted(source[layer].tolist()) == list(range(num_ranks))
        assert all(source[layer, j] // block == j // block for j in range(num_ranks))  # stays in its block
        score = dense_overlap(new[layer], old[layer], num_ranks) * (block + 1) + np.eye(num_ranks, dtype=np.int64)
        best = 0
        for start in range(0, num_ranks, block):
            part = score[start:start + block, start:start + block]
            rows, cols = linear_sum_assignment(part, maximize=True)
            best += part[rows, cols].sum()
        assert score[source[layer], np.arange(num_ranks)].sum() == best


def test_rank_overlap_is_the_plain_count():
    rng = np.random.default_rng(5)
    new, old = rng.integers(0, 5, size=(3, 12)), rng.integers(0, 5, size=(3, 12))
    overlap = rank_overlap(new, old, 4)
    for layer in range(3):
        np.testing.assert_array_equal(overlap[layer], dense_overlap(new[layer], old[layer], 4))


def test_a_rank_that_kept_its_experts_keeps_its_place():
    old = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    # ranks 0 and 3 unchanged; ranks 1 and 2 exchanged their experts, so relabelling undoes it
    new = np.array([[1, 0, 4, 5, 2, 3, 7, 6]])
    assert match_ranks(new, old, 4, across_nodes=True).tolist() == old.tolist()
    for dense_up_to in (0, 256):
        assert unit_permutation(new, old, 4, 4, dense_up_to).tolist() == [[0, 2, 1, 3]]
