"""benchmarks/profile_step.py's trace summary, on a synthetic trace laid out as the kernel writes
it (cpp/include/flashformer/trace.hpp): per-op critical-path spans add up to the step, phases come
out in milliseconds, and SMs without units of a task are left out of its means."""

from __future__ import annotations

import numpy as np
import pytest

from flashformer import _core


@pytest.fixture(scope="module")
def profile_step(benchmark_script):
    return benchmark_script("profile_step")


def synthetic_trace(layers: int, sms: int, idle_sm_task: int) -> np.ndarray:
    """Every SM runs every task back to back: 100 ns of dependency wait, 900 ns of work, 100 ns to
    signal (of which the last 70 ns after the CTA barrier); SM s starts s ns late; one SM has no units of task `idle_sm_task`. 2 cycles per ns."""
    layout = _core.load().TRACE_LAYOUT
    nh, nf = len(layout["header"]), len(layout["fields"])
    tasks = len(_core.load().step_tasks(layers))
    raw = np.zeros((sms, nh + tasks * nf), dtype=np.uint64)
    f = {name: i for i, name in enumerate(layout["fields"])}
    last_signal = 1_000 + (sms - 1) + tasks * 1_100  # the last SM's last task
    for s in range(sms):
        t = 1_000 + s
        raw[s, :nh] = [1_000, 10_000, last_signal, 10_000 + 2 * (last_signal - 1_000)]
        for i in range(tasks):
            if s == 0 and i == idle_sm_task:
                continue
            row = raw[s, nh + i * nf: nh + (i + 1) * nf]
            row[f["task_start_ns"]], row[f["ready_ns"]] = t, t + 100
            row[f["computed_ns"]], row[f["synced_ns"]], row[f["signalled_ns"]] = t + 1_000, t + 1_030, t + 1_100
            row[f["data_wait_cycles"]], row[f["slot_wait_cycles"]], row[f["land_wait_cycles"]] = 400, 200, 60
            row[f["produce_start_ns"]], row[f["produce_end_ns"]] = t - 500, t + 500
            t += 1_100
    return raw


def test_summary_of_a_synthetic_trace(profile_step):
    layers, sms = 3, 4
    s = profile_step.summarize_trace(synthetic_trace(layers, sms, idle_sm_task=2), layers)
    ops = s["per_op"]
    assert set(ops) == set(_core.load().OPS)
    assert s["clock_ghz"] == pytest.approx(2.0, rel=1e-3)
    assert sum(d["span"] for d in ops.values()) == pytest.approx(s["span_ms"], abs=1e-9)
    assert ops["qkv"]["tasks"] == layers and ops["embed"]["tasks"] == 1 and ops["lm_head"]["tasks"] == 1
    per_task = {"dep_wait": 100e-6, "compute": 900e-6, "signal": 100e-6, "fence": 70e-6, "data_wait": 200e-6,
                "slot_wait": 100e-6, "land_wait": 30e-6}
    for name, d in ops.items():
        for key, ms in per_task.items():
            assert d[key] == pytest.approx(ms * d["tasks"], rel=1e-6), (name, key)
        assert d["lead"] == pytest.approx(600e-6, rel=1e-6)  # producer 500 ns before the start, + 100 ns wait
    assert "attention" in profile_step.format_trace(s)


def test_traced_hands_the_buffer_to_the_engine_and_takes_it_back(profile_step):
    """traced(): the engine writes into the buffer it was given (here the fake's fn, on the CPU);
    the last write comes back as [sms, words] uint64, and trace and timing variant are off after,
    also when fn raises."""
    import ctypes
    from types import SimpleNamespace

    import torch

    engine = SimpleNamespace(trace_words=6, num_sms=2, trace=0, timing_variant=0)
    mk = SimpleNamespace(engine=engine, device=torch.device("cpu"))

    def steps():
        assert engine.timing_variant == 5
        for value in (1, 7):  # two steps: the second overwrites the first
            (ctypes.c_int64 * 6).from_address(engine.trace)[:] = [value * 10 + i for i in range(6)]

    raw = profile_step.traced(mk, steps, variant=5)
    assert raw.dtype == np.uint64 and raw.tolist() == [[70, 71, 72], [73, 74, 75]]
    assert engine.trace == 0 and engine.timing_variant == 0
    with pytest.raises(RuntimeError):
        profile_step.traced(mk, lambda: (_ for _ in ()).throw(RuntimeError("step failed")), variant=3)
    assert engine.trace == 0 and engine.timing_variant == 0
