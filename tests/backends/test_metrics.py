"""The moving averages routing decisions are made from."""

from __future__ import annotations

import pytest

from backends.metrics import Ewma


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
