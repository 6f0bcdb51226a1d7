"""Every dtype moves bitwise: two real Gloo ranks move experts made of float8 (e4m3fn, e5m2), bf16, fp16, int8 with
fp32 scales, packed int4 in uint8 and block scales (uint8, float8_e8m0fnu where torch has it), several tensors per
expert with different shapes, and compare bytes; a tensor that cannot be moved as bytes is refused at construction,
before anything starts."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from eplb import Placement, Topology  # noqa: E402
from eplb.errors import EplbError  # noqa: E402
from gloo_ranks import run_ranks  # noqa: E402

TOPOLOGY = Topology(2, 3)  # P = 6
EXPERTS, LAYERS = 4, 3
#: one expert's tensors: (dtype name, shape); bytes of any pattern (float NaNs included) must arrive unchanged
EXPERT = [("float8_e4m3fn", (2, 8, 6)), ("float8_e5m2", (8, 4)), ("bfloat16", (5,)), ("float16", (3, 2)),
          ("int8", (4, 4)), ("float32", (4,)),  # int8 weights and their per-row fp32 scales
          ("uint8", (4, 3)),  # packed int4: two values per byte
          ("uint8", (2, 2)), ("float8_e8m0fnu", (2,))]  # block scales
DTYPES = [(getattr(torch, name), shape) for name, shape in EXPERT if hasattr(torch, name)]


def fresh(layer: int, local_row) -> list:
    """The tensors of this rank's slots holding the experts ``local_row`` of ``layer``: random bytes per
    (layer, expert), viewed as each dtype."""
    out = []
    for index, (dtype, shape) in enumerate(DTYPES):
        width = torch.empty(0, dtype=dtype).element_size() * int(np.prod(shape))
        rows = [np.random.default_rng([layer, expert, index]).integers(0, 256, width, dtype=np.uint8)
                for expert in np.asarray(local_row).tolist()]
        out.append(torch.from_numpy(np.stack(rows)).view(dtype).reshape(len(rows), *shape).contiguous())
    return out


def local(row, rank: int) -> np.ndarray:
    k = TOPOLOGY.slots_per_rank
    return np.asarray(row)[rank * k:(rank + 1) * k]


def same_bytes(tensors, layer: int, row, rank: int) -> bool:
    expected = fresh(layer, local(row, rank))
    return all(a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(tensors, expected))


def _rank_main(rank: int, tmp: str) -> dict:
    from eplb.runtime.mover import ExpertMover
    from eplb.cycle.transfers import transfer_plan

    out = {}
    old = Placement.initial(EXPERTS, TOPOLOGY, LAYERS)  # [0 1 2 | 3 0 1]
    new = Placement(np.array([[3, 2, 1, 0, 1, 2],  # everything crosses or changes slot
                              [1, 0, 3, 2, 3, 0],  # duplicates on both ranks
                              [0, 1, 2, 3, 2, 1]]), EXPERTS, TOPOLOGY)
    tensors = [fresh(layer, local(old.phy2log[layer], rank)) for layer in range(LAYERS)]
    addresses = [[t.data_ptr() for t in ts] for ts in tensors]
    mover = ExpertMover(tensors, rank, TOPOLOGY.slots_per_rank)
    plan = transfer_plan(old, new)
    mover.commit(mover.post(plan[:1]))  # one layer alone, then the others in one post
    mover.commit(mover.post(plan[1:]))
    out["bitwise"] = [same_bytes(tensors[layer], layer, new.phy2log[layer], rank) for layer in range(LAYERS)]
    out["in_place"] = addresses == [[t.data_ptr() for t in ts] for ts in tensors]
    out["dtypes"] = [str(t.dtype) for t in tensors[0]]
    return out


@pytest.mark.dist
@pytest.mark.slow
def test_every_dtype_moves_bitwise_on_two_gloo_ranks(tmp_path):
    for rank, out in enumerate(run_ranks(_rank_main, 2, str(tmp_path), timeout_s=300)):
        assert "error" not in out, out["error"]
        assert out["bitwise"] == [True] * LAYERS and out["in_place"], (rank, out)
        assert {"torch.float8_e4m3fn", "torch.float8_e5m2", "torch.bfloat16", "torch.int8"} <= set(out["dtypes"])


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("bad, message", [
    (lambda: torch.quantize_per_tensor(torch.ones(3, 4), 0.1, 0, torch.qint8), r"layer 0, tensor 1 \(torch.qint8"),
    (lambda: torch.ones(4, 3).t(), "layer 0, tensor 1 is not contiguous"),
    (lambda: torch.ones(3, 2, dtype=torch.complex64).conj(), "cannot be viewed as bytes"),
    (lambda: torch.ones(2, 4), r"expected shape \[3, ...\]"),
])
def test_a_tensor_that_cannot_move_as_bytes_is_refused_before_anything_starts(bad, message):
    from eplb.runtime import EplbConfig, EplbController

    import threading

    tensors = [[torch.ones(3, 4), bad()]]
    config = EplbConfig.from_dict({"mode": "dynamic", "window_steps": 4})
    threads = threading.active_count()
    with pytest.raises(EplbError, match=message):
        EplbController(config, 1, EXPERTS, TOPOLOGY, 0, layer_tensors=tensors)
    assert threading.active_count() == threads  # no side thread, no planner reader
