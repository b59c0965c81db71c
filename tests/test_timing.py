"""The interleaving every benchmark measures with: rotating order, loops that drive turns, block ratios."""

from __future__ import annotations

import time

import pytest

from evaluation.timing import Ratio, Turns, ratio, rotated


def test_rotated_order_puts_every_contender_first_in_turn():
    names = ["a", "b", "c"]
    assert [rotated(names, k) for k in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                     ["a", "b", "c"]]


def test_turns_run_each_callable_once_per_turn_in_rotating_order_between_a_loops_steps():
    calls = []
    turns = Turns({name: (lambda name=name: calls.append(name)) for name in ("x", "y")})
    after_step = turns.between("loop")
    for _ in range(3):  # a loop whose step (timed by itself) and bookkeeping after it take 0.02 s each
        calls.append("loop")
        time.sleep(0.02)
        after_step(0.02)
        time.sleep(0.02)
    assert calls == ["loop", "x", "y", "loop", "y", "x", "loop", "x", "y"]
    first, *later = turns.seconds["loop"]
    assert first == 0.02  # no period before the first step: the loop's own figure
    assert all(0.04 <= s < 0.5 for s in later)  # step and bookkeeping, not the other contenders' turns
    assert len(turns.seconds["x"]) == len(turns.seconds["y"]) == 3 and all(s >= 0 for s in turns.seconds["x"])


def test_ratio_is_the_median_and_range_of_block_ratios_without_the_warm_up():
    numerator = [100.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 9.0]  # the first turn (warm-up) is left out
    denominator = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 9.0]
    assert ratio(numerator, denominator, blocks=3) == Ratio(median=2.0, low=1.0, high=3.0, blocks=3)  # 7th pair dropped
    assert str(ratio(numerator, denominator, blocks=3)) == "2.000 [1.000-3.000]"
    with pytest.raises(ValueError, match="7 timed turns cannot make 8 blocks"):
        ratio(numerator, denominator, blocks=8)
