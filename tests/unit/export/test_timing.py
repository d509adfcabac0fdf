"""Stable timing: every latency series lasts a minimum time, is split into rounds, and reports their spread."""

from __future__ import annotations

import time

import numpy as np
import pytest

from slimforge.export.measure import TimingConfig, latency_rounds, latency_stats, time_forward
from slimforge.export.runtimes.base import Runtime


class Sleeper(Runtime):
    """A runtime whose every call takes ``delay`` seconds (the test changes it between rounds)."""

    def __init__(self, delay: float) -> None:
        super().__init__(threads=1)
        self.delay = delay
        self.calls = 0

    def forward(self, inputs):
        self.calls += 1
        deadline = time.perf_counter() + self.delay
        while time.perf_counter() < deadline:  # busy-wait: sleep() granularity is coarser than 1 ms on some kernels
            pass
        return inputs


def test_a_series_lasts_its_minimum_time_and_makes_its_minimum_calls():
    rt = Sleeper(1e-3)
    t = time_forward(rt, np.zeros((1, 1, 2, 2), np.float32), runs=3, warmup=2, min_time_s=0.05)
    assert len(t) > 3 and rt.calls == len(t) + 2 and t.sum() >= 0.05 * 0.9  # more calls than `runs` asked
    assert len(time_forward(Sleeper(1e-4), np.zeros((1, 1), np.float32), runs=7, warmup=0)) == 7


def test_rounds_split_the_runs_and_each_lasts_its_minimum():
    cfg = TimingConfig(runs=10, rounds=4, min_round_s=0.02, warmup=0)
    rounds = latency_rounds(Sleeper(1e-3), np.zeros((1, 1), np.float32), cfg)
    assert len(rounds) == 4
    for r in rounds:
        assert len(r) >= 3 and r.sum() >= 0.02 * 0.9  # ceil(10 / 4) calls, and >= 20 ms


def test_stats_take_the_median_of_round_medians_and_flag_a_machine_that_moved():
    steady = [np.array([1.0, 1.1, 0.9]), np.array([1.02, 1.0, 0.98]), np.array([1.05, 0.95, 1.0])]
    s = latency_stats(steady, unstable_spread=0.10)
    assert s["round_p50"] == [1.0, 1.0, 1.0] and s["p50"] == 1.0 and s["spread"] == 0.0 and s["stable"]
    assert s["runs"] == 9 and s["min"] == 0.9 and s["p99"] == pytest.approx(np.percentile(np.concatenate(steady), 99))

    # One round in a slow state: the p50 stays with the majority, the spread reports the move.
    moved = [*steady[:2], np.array([1.5, 1.6, 1.4]), steady[2]]
    m = latency_stats(moved, unstable_spread=0.10)
    assert m["p50"] == pytest.approx(1.0) and m["spread"] == pytest.approx(0.5) and not m["stable"]
    assert latency_stats(moved, unstable_spread=0.6)["stable"]


def test_a_real_slowdown_between_rounds_is_measured_as_spread():
    rt = Sleeper(1e-3)
    cfg = TimingConfig(runs=4, rounds=2, min_round_s=0.01, warmup=0)
    first = latency_rounds(rt, np.zeros((1, 1), np.float32), cfg)
    rt.delay = 3e-3
    second = latency_rounds(rt, np.zeros((1, 1), np.float32), cfg)
    s = latency_stats([r * 1e3 for r in first + second], unstable_spread=0.10)
    # Rounds of 1 and 3 ms: (3 - 1) / 2 = 1 on a quiet machine; preemption on a busy one only narrows it a little.
    assert s["spread"] > 0.4 and not s["stable"]


def test_timing_options_are_validated():
    bad = TimingConfig(rounds=0, min_round_s=-1, unstable_spread=0).validate()
    assert any(p.startswith("rounds") for p in bad) and any(p.startswith("min_round_s") for p in bad)
    assert any(p.startswith("unstable_spread") for p in bad)
