"""The error hierarchy (eplb.errors): bad input is a ValueError, a runtime failure is not, and failures cross process
boundaries intact (a launched rank's failure reaches the parent pickled)."""

from __future__ import annotations

import pickle

import pytest

import eplb.errors as errors
from eplb.errors import EplbError, EplbException, EplbFailure, LaunchError, PeerError, RankFailure, SideThreadDied


def test_bad_input_is_a_value_error_and_failures_are_not():
    for name in errors.__all__:
        cls = getattr(errors, name)
        if not isinstance(cls, type):
            continue
        assert issubclass(cls, EplbException), name
        if cls is EplbException:
            continue
        # exactly one branch: the caller's input, or something that failed while running
        assert issubclass(cls, EplbError) != issubclass(cls, EplbFailure), name
        assert issubclass(cls, ValueError) == issubclass(cls, EplbError), name
    for cls in (RankFailure, LaunchError, PeerError, SideThreadDied):
        assert issubclass(cls, RuntimeError) and not issubclass(cls, ValueError)


@pytest.mark.parametrize("error", [
    RankFailure([3, 1]),
    SideThreadDied("side", ValueError("boom")),
    LaunchError("rank 2 exited with code 1"),
    PeerError("the all-reduce timed out"),
    EplbError("--ranks must be >= 1, got 0"),
], ids=lambda e: type(e).__name__)
def test_errors_pickle_with_their_message_and_fields(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)
    assert getattr(back, "ranks", None) == getattr(error, "ranks", None)
    if isinstance(error, SideThreadDied):
        assert back.name == "side" and isinstance(back.cause, ValueError) and str(back.cause) == "boom"


def test_rank_failure_names_its_ranks_in_order():
    assert RankFailure([3, 1]).ranks == [1, 3]
    assert "ranks [1, 3] stopped beating" in str(RankFailure([3, 1]))
