"""bench/gpu_train.py's within-run A/B (`--ab LEVER`): which setting each step takes, and how the two arms
are compared. Runs on the CPU: the harness syncs the device only where there is one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def gpu_train(bench_script):
    return bench_script("gpu_train")


def test_the_warm_up_takes_both_settings_then_the_timed_steps_go_abba(gpu_train):
    taken = []
    ab = gpu_train.Alternate(2, taken.append)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
    for step in range(10):
        state.global_step = step
        ab.on_step_begin(None, state, None)
        state.num_input_tokens_seen += 100 + step
        ab.on_step_end(None, state, None)
    ab.on_train_end(None, state, None)
    assert taken == [True, False, True, False, False, True, True, False, False, True]
    assert [e[0] for e in ab.result["ab_steps"]] == [1, 0, 0, 1, 1, 0, 0, 1]  # the warm-up steps are not timed
    assert [e[2] for e in ab.result["ab_steps"]] == [102, 103, 104, 105, 106, 107, 108, 109]


def test_one_slow_step_turns_the_all_steps_ratio_but_not_the_median_one(gpu_train):
    # the lever's arm is 4 % faster on every step but its first, which pays a one-time second
    on = [[1, 2.0 + 1.0, 32000]] + [[1, 2.0, 32000]] * 5
    off = [[0, 2.08, 32000]] * 6
    result = gpu_train.ab_summary(on + off)
    assert result["ab_ratio"] < 1  # 192,000 tokens in 13.0 s against 12.48 s
    assert result["ab_median_ratio"] == pytest.approx(1.04)
    assert result["ab_tokens_per_s_on"] == round(192000 / 13.0)
    assert gpu_train.ab_summary([])["ab_ratio"] == 0.0  # no timed steps: no ratio, no division by zero
