"""Trace generators: calibration of the parametric profile, sampling, scenarios, save / load."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eplb.errors import LoadError
from eplb.sim.traces import TOP_K, parametric_profile


def test_parametric_profile_matches_deepseek_v3_skew(dsv3_counts):
    """The hottest expert over the layer mean, per layer, against the real DeepSeek-V3 loads (not the constants the
    profile is built from): its layer average lies within the real workloads' range, its spread across layers (log-std)
    within theirs, and its 10th / 50th / 90th percentiles within 15% of the real ones pooled over workloads."""
    profile = parametric_profile()
    assert profile.shape == (58, 256) and profile.dtype == np.float64
    np.testing.assert_allclose(profile.sum(axis=1), TOP_K)
    assert (profile > 0).all() and profile.max() <= 1.0
    hottest = profile.max(axis=1) / profile.mean(axis=1)
    real = dsv3_counts.max(axis=-1) / dsv3_counts.mean(axis=-1)  # [workloads, layers]
    assert real.mean(axis=1).min() <= hottest.mean() <= real.mean(axis=1).max()
    real_spread = np.log(real).std(axis=1)
    assert real_spread.min() <= np.log(hottest).std() <= real_spread.max()
    quantiles = [0.1, 0.5, 0.9]
    np.testing.assert_allclose(np.quantile(hottest, quantiles), np.quantile(real, quantiles), rtol=0.15)


def test_parametric_profile_close_to_real_sorted_curve(dsv3_counts):
    real = dsv3_counts / dsv3_counts.sum(axis=-1, keepdims=True)
    real_curve = np.sort(real, axis=-1)[..., ::-1].mean(axis=(0, 1))
    profile = parametric_profile()
    ours = np.sort(profile / profile.sum(axis=1, keepdims=True), axis=1)[:, ::-1].mean(axis=0)
    np.testing.assert_allclose(ours, real_curve, rtol=0.35, atol=0.0002)


def test_parametric_profile_is_seeded():
    np.testing.assert_array_equal(parametric_profile(seed=3), parametric_profile(seed=3))
    assert not np.array_equal(parametric_profile(seed=3), parametric_profile(seed=4))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 64), st.integers(1, 8), st.integers(0, 2**31))
def test_parametric_profile_any_size_is_a_valid_popularity(num_layers, num_experts, top_k, seed):
    top_k = min(top_k, num_experts)
    profile = parametric_profile(num_layers, num_experts, seed, top_k)
    np.testing.assert_allclose(profile.sum(axis=1), top_k)
    assert (profile >= 0).all() and profile.max() <= 1.0 + 1e-9


def test_parametric_profile_rejects_bad_sizes():
    with pytest.raises(LoadError, match="top_k"):
        parametric_profile(2, 4, 0, top_k=5)


# -- generated traces -----------------------------------------------------------------------------------------------

from eplb.errors import FormatError  # noqa: E402
from eplb.sim.traces import (  # noqa: E402
    SCENARIOS,
    Regimes,
    Trace,
    TraceSpec,
    builtin_trace,
    generate_trace,
    load_trace,
    parametric_regimes,
    real_regimes,
)


@pytest.fixture(scope="module")
def small_regimes():
    return parametric_regimes(num_layers=4, num_experts=32, seed=1, num_regimes=4)


def shares(trace):
    counts = trace.counts.astype(float)
    return counts / counts.sum(axis=-1, keepdims=True)


def test_generated_trace_counts_tokens_times_top_k(small_regimes):
    spec = TraceSpec(steps=300, decode_tokens=256, prefill_tokens=2048, prefill_run=3, decode_run=10, requests=3)
    trace = generate_trace(small_regimes, spec, seed=5)
    assert trace.counts.dtype == np.int32 and trace.counts.shape == (300, 4, 32)
    assert 0 < trace.prefill.mean() < 0.5
    totals = trace.counts.sum(axis=-1)
    np.testing.assert_array_equal(totals[trace.prefill], 2048 * TOP_K)
    decode = totals[~trace.prefill]
    assert (decode % TOP_K == 0).all() and (decode >= 0.9 * 256 * TOP_K - TOP_K).all() \
        and (decode <= 1.1 * 256 * TOP_K + TOP_K).all()
    assert (totals == totals[:, :1]).all()  # every layer of a step routes the same tokens
    assert (trace.counts <= (totals[..., None] // TOP_K)).all()  # an expert gets a token at most once


@settings(max_examples=15, deadline=None)
@given(st.integers(9, 16), st.integers(1, 40), st.integers(0, 1000))
def test_top_k_distinct_approximation_keeps_totals_when_the_cap_binds(num_experts, tokens, seed):
    regimes = parametric_regimes(num_layers=2, num_experts=num_experts, seed=seed, num_regimes=2)
    trace = generate_trace(regimes, TraceSpec(steps=20, decode_tokens=tokens, requests=2, request_share=0.5),
                           seed=seed)
    totals = trace.counts.sum(axis=-1)
    tokens_per_step = totals // TOP_K
    np.testing.assert_array_equal(totals, tokens_per_step * TOP_K)
    assert (trace.counts <= tokens_per_step[..., None]).all()


def test_same_seed_same_trace_other_seed_other_trace(small_regimes):
    spec = TraceSpec(steps=120, requests=2, prefill_run=2)
    a, b = generate_trace(small_regimes, spec, 3), generate_trace(small_regimes, spec, 3)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.prefill, b.prefill)
    assert not np.array_equal(a.counts, generate_trace(small_regimes, spec, 4).counts)


def test_requests_make_per_step_variance_exceed_sampling_noise(small_regimes):
    steady = generate_trace(small_regimes, TraceSpec(steps=400, segment=None, decode_tokens=2048), 0)
    bursty = generate_trace(small_regimes, TraceSpec(steps=400, segment=None, decode_tokens=2048, requests=4,
                                                     request_share=0.3), 0)

    def excess_variance(trace):
        share = shares(trace)
        mean = share.mean(axis=0)
        sampling = mean * (1 - mean) / (trace.counts.sum(axis=-1).mean())  # multinomial variance of a share
        return np.median(share.var(axis=0) / sampling)

    assert excess_variance(steady) < 1.5
    assert excess_variance(bursty) > 3.0


def test_continuous_batching_serves_a_batch_that_follows_the_live_requests(small_regimes):
    from eplb.sim.trace_dynamics import live_requests as _live_requests

    # (birth, death, share): alive in [birth, death)
    requests = np.array([[0, 3, 0.1], [1, 2, 0.1], [2, 9, 0.1], [4, 5, 0.1]])
    np.testing.assert_array_equal(_live_requests(requests, 6), [1, 2, 2, 1, 2, 1])
    spec = TraceSpec(steps=400, segment=None, requests=16, request_steps=40, request_share=0.85, tokens_per_request=8)
    tokens = generate_trace(small_regimes, spec, 5).counts[:, 0].sum(axis=-1) // small_regimes.top_k
    assert (tokens % 8 == 0).all()  # whole requests
    assert tokens.std() > 0.1 * tokens.mean()  # arrivals and departures move the batch
    assert 0.5 * 16 * 8 < tokens.mean() < 1.5 * 16 * 8  # about `requests` live at a time
    with pytest.raises(LoadError, match="tokens_per_request"):
        TraceSpec(tokens_per_request=-1)


def test_olmoe_scenario_is_another_model_family():
    trace = builtin_trace("olmoe", steps=50)
    assert trace.counts.shape == (50, 16, 64) and trace.top_k == 8
    assert (trace.counts.sum(axis=-1) == trace.counts[:, :1].sum(axis=-1)).all()  # every layer routes every token
    assert builtin_trace("olmoe", steps=20, num_experts=128).counts.shape == (20, 16, 128)


def test_drift_moves_the_load_between_regimes(small_regimes):
    steady = generate_trace(small_regimes, TraceSpec(steps=600, segment=None), 2)
    drift = generate_trace(small_regimes, TraceSpec(steps=600, segment=(100, 150), blend=0.5), 2)

    def change(trace):  # mean distance between consecutive 50-step windows' popularity
        windows = trace.counts.reshape(12, 50, 4, 32).sum(axis=1).astype(float)
        windows /= windows.sum(axis=-1, keepdims=True)
        return np.abs(np.diff(windows, axis=0)).sum(axis=-1).mean()

    assert change(drift) > 2 * change(steady)
    step_change = np.abs(np.diff(shares(drift), axis=0)).sum(axis=-1).mean()
    assert step_change < 3 * np.abs(np.diff(shares(steady), axis=0)).sum(axis=-1).mean()  # smooth, no jumps


def test_trace_save_load_round_trip_and_replay(tmp_path, small_regimes):
    trace = generate_trace(small_regimes, TraceSpec(steps=50, prefill_run=2), 1, name="mine")
    path = tmp_path / "trace.npz"
    trace.save(path)
    back = Trace.load(path)
    np.testing.assert_array_equal(back.counts, trace.counts)
    np.testing.assert_array_equal(back.prefill, trace.prefill)
    assert (back.name, back.top_k) == ("mine", TOP_K)
    replay = load_trace(str(path), steps=20)
    np.testing.assert_array_equal(replay.counts, trace.counts[:20])
    from eplb.formats import read_load

    np.testing.assert_array_equal(read_load(path), trace.counts)  # a plain load file too
    assert not list(tmp_path.glob(".*tmp"))


def test_window_load_file_becomes_the_workload_of_a_generated_trace(tmp_path):
    window = (parametric_regimes(3, 16, 0, 1).profiles[0] * 1000).round()
    np.savez(tmp_path / "window.npz", counts=window)
    trace = load_trace(str(tmp_path / "window.npz"), steps=30)
    assert trace.counts.shape == (30, 3, 16) and trace.name == "builtin:default"


def test_bad_trace_inputs_are_named(tmp_path):
    with pytest.raises(LoadError, match=r"unknown built-in trace 'builtin:drfit'.*did you mean builtin:drift"):
        load_trace("builtin:drfit")
    with pytest.raises(FormatError, match="no such file"):
        Trace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(FormatError, match="junk.npz: not a .npz archive"):
        Trace.load(tmp_path / "junk.npz")
    with pytest.raises(LoadError, match=r"\[steps, layers, experts\]"):
        Trace.from_counts(np.ones((4, 8)))
    with pytest.raises(LoadError, match="fractional"):
        Trace.from_counts(np.full((2, 1, 3), 0.5))
    with pytest.raises(LoadError, match="negative"):
        Trace.from_counts(-np.ones((2, 1, 3)))
    with pytest.raises(LoadError, match="segment"):
        TraceSpec(segment=(10, 5))
    with pytest.raises(LoadError, match="request_share"):
        TraceSpec(request_share=1.0)
    with pytest.raises(LoadError, match="only go with a built-in trace"):
        load_trace(str(tmp_path / "x.npz"), workloads=str(tmp_path / "w.npz"))


def test_builtin_scenarios_exist_and_are_parametric_by_default():
    assert {"default", "drift", "bursty", "phases"} <= set(SCENARIOS)
    trace = builtin_trace("phases", steps=40, num_layers=2, num_experts=16)
    assert trace.counts.shape == (40, 2, 16) and trace.name == "builtin:phases" and trace.prefill.any()


def test_real_regimes_from_the_deepseek_v3_statistics(data_dir, tmp_path):
    regimes = real_regimes(data_dir / "sglang_dsv3_ep_statistics.npz")
    assert isinstance(regimes, Regimes) and regimes.profiles.shape == (12, 58, 256)
    np.testing.assert_allclose(regimes.profiles.sum(axis=-1), 8)
    assert regimes.prefill.sum() == 8 and regimes.names[0] == "decode_in1000out1000"
    trace = load_trace(str(data_dir / "sglang_dsv3_ep_statistics.npz"), steps=30)
    assert trace.counts.shape == (30, 58, 256)
    drift = load_trace("builtin:drift", steps=30, workloads=str(data_dir / "sglang_dsv3_ep_statistics.npz"))
    assert drift.name == "builtin:drift"
    np.savez(tmp_path / "trace.npz", counts=np.ones((3, 2, 4)))
    with pytest.raises(FormatError, match="not a workload-statistics .npz"):
        real_regimes(tmp_path / "trace.npz")


def test_multinomial_sampler_sums_exactly_and_matches_multinomial_moments():
    from eplb.sim._sampling import multinomial_rows

    pvals = np.tile(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005]), (4000, 1))
    totals = np.full(4000, 3000)
    counts = multinomial_rows(totals, pvals, 7)
    assert (counts.sum(axis=1) == 3000).all() and (counts >= 0).all()
    np.testing.assert_allclose(counts.mean(axis=0), 3000 * pvals[0], rtol=0.02)
    np.testing.assert_allclose(counts.var(axis=0), 3000 * pvals[0] * (1 - pvals[0]), rtol=0.1)
    np.testing.assert_array_equal(counts, multinomial_rows(totals, pvals, 7))
