"""benchmarks/profile_generate.py's summaries, on synthetic inputs: the device timeline's per-step
figures (medians, and the mean, 90th percentile and maximum that show the steps which waited), and
a step trace's CTA start times."""

from __future__ import annotations

import numpy as np
import pytest

from flashformer import _core


@pytest.fixture(scope="module")
def profile_generate(benchmark_script):
    return benchmark_script("profile_generate")


def test_breakdown_of_a_synthetic_timeline(profile_generate):
    """Steps of 900 us every 1000 us, a 15 us sampler 3 us after each; one step 200 us late."""
    records, t = [], 0.0
    for i in range(30):
        t += 200.0 if i == 20 else 0.0
        records += [("megakernel<...>", t, t + 900.0), ("sample_kernel", t + 903.0, t + 918.0)]
        t += 1000.0
    b = profile_generate.breakdown(records, skip=8)
    assert b["steps"] == 21 and b["after_kind"] == "sampler"
    assert b["step_us"] == 900.0 and b["after_us"] == 15.0 and b["gap_to_after_us"] == 3.0
    assert b["per_step_us"] == 1000.0 and b["gap_to_next_us"] == 82.0  # medians: the late step is hidden
    assert b["per_step_max_us"] == 1200.0 and b["per_step_mean_us"] == pytest.approx(1000.0 + 200.0 / 21, abs=0.01)
    assert b["per_step_p90_us"] == 1000.0


def test_start_spread_of_a_synthetic_trace(profile_generate):
    layout = _core.load().TRACE_LAYOUT
    raw = np.zeros((6, len(layout["header"]) + 4), dtype=np.uint64)
    raw[:, layout["header"].index("start_ns")] = [5_000, 5_400, 5_100, 9_000, 5_000, 7_000]
    s = profile_generate.start_spread(raw, late=3)
    assert s["start_spread_us"] == 4.0 and s["start_p50_us"] == pytest.approx(0.25)
    assert s["late_ctas"] == [3, 5, 1] and s["late_us"] == [4.0, 2.0, 0.4]
