"""The moving averages routing decisions are made from."""

from __future__ import annotations

import pytest

from backends.metrics import TPOT_WINDOW_TOKENS, BackendMetrics, Ewma, StreamTiming


def test_ewma_weights_samples_by_elapsed_time_not_by_count() -> None:
    ewma = Ewma(tau_s=10.0)
    ewma.update(1.0, now=0.0)
    ewma.update(3.0, now=0.0)  # no time passed: the old value keeps all its weight
    assert ewma.value == pytest.approx(1.0)
    ewma.update(3.0, now=1000.0)  # long ago: the new sample takes over
    assert ewma.value == pytest.approx(3.0)


def test_peak_ewma_jumps_to_a_slower_sample_and_decays_back_slowly() -> None:
    plain, peak = Ewma(tau_s=10.0), Ewma(tau_s=10.0, peak=True)
    for ewma in (plain, peak):
        ewma.update(0.1, now=0.0)
        ewma.update(2.0, now=1.0)
    assert peak.value == 2.0
    assert plain.value is not None and plain.value < 0.5
    peak.update(0.1, now=2.0)
    assert peak.value is not None and 1.5 < peak.value < 2.0  # recovers gradually
    peak.update(0.1, now=100.0)
    assert peak.value == pytest.approx(0.1, abs=1e-3)


def test_per_token_time_is_the_mean_over_a_window_not_the_burstiest_gap() -> None:
    # Chunks that travel in bursts: one 40 ms gap, then three of 0 ms: 10 ms per token.
    metrics = BackendMetrics()
    timing = StreamTiming(metrics, "b", "m", started=0.0, observer=None)
    now = 0.05
    timing.token(now)  # the first token, 50 ms after the start
    for i in range(2 * TPOT_WINDOW_TOKENS):
        now += 0.04 if i % 4 == 0 else 0.0
        timing.token(now)
    timing.finish(completion_tokens=1 + 2 * TPOT_WINDOW_TOKENS)
    perf = metrics.model("m")
    assert perf.ttft_s.value == pytest.approx(0.05)
    assert perf.tpot_s.value == pytest.approx(0.01)
    assert metrics.tokens_generated == 1 + 2 * TPOT_WINDOW_TOKENS


def test_a_short_answer_still_measures_its_per_token_time_when_it_ends() -> None:
    metrics = BackendMetrics()
    timing = StreamTiming(metrics, "b", "m", started=0.0, observer=None)
    for now in (0.1, 0.12, 0.14):
        timing.token(now)
    assert metrics.model("m").tpot_s.value is None  # fewer gaps than a window so far
    timing.finish(completion_tokens=3)
    assert metrics.model("m").tpot_s.value == pytest.approx(0.02)
