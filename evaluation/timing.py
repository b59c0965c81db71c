"""Timing contenders side by side on a noisy machine: in turns (A, B, C, then B, C, A, then C, A, B, ...), so a
load that comes and goes hits every contender alike, and ratios summarised over blocks of turns as median
[min-max] instead of one figure from two sequential phases.

A contender is either a callable timed here (`Turns.run`) or a loop that times its own steps and calls
`Turns.run` between them (the trainers' `after_step`): its seconds are added with `Turns.add`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def rotated(names: list[str], turn: int) -> list[str]:
    """`names` rotated left by `turn`: every contender goes first, and follows every other, equally often."""
    shift = turn % len(names) if names else 0
    return names[shift:] + names[:shift]


class Turns:
    """Seconds per call of each contender, measured in rotating order, one call each per turn."""

    def __init__(self, contenders: dict[str, Callable[[], object]], synchronize: Callable[[], None] | None = None):
        self.contenders = contenders
        self.synchronize = synchronize or (lambda: None)  # torch.cuda.synchronize on a GPU
        self.seconds: dict[str, list[float]] = {name: [] for name in contenders}
        self.turn = 0

    def run(self) -> None:
        """One turn: every callable contender once, in this turn's order."""
        for name in rotated(list(self.contenders), self.turn):
            self.synchronize()
            start = time.perf_counter()
            self.contenders[name]()
            self.synchronize()
            self.seconds[name].append(time.perf_counter() - start)
        self.turn += 1

    def add(self, name: str, seconds: float) -> None:
        """A step timed by a loop that calls `run` between its steps."""
        self.seconds.setdefault(name, []).append(seconds)

    def between(self, name: str) -> Callable[[float], None]:
        """The `after_step` of a loop timed as contender `name`: a turn of the callable contenders runs after
        each of its steps, so its steps and theirs alternate. The loop's time is its whole period, from the end
        of one turn to the start of the next: the step and the loop's own bookkeeping after it (progress,
        logs, counters). The first step has no period before it: the seconds the loop passes are kept."""
        resumed: list[float] = []

        def after_step(seconds: float) -> None:
            self.synchronize()
            self.add(name, time.perf_counter() - resumed[0] if resumed else seconds)
            self.run()
            resumed[:] = [time.perf_counter()]

        return after_step


@dataclass(frozen=True)
class Ratio:
    median: float
    low: float
    high: float
    blocks: int

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.low:.3f}-{self.high:.3f}]"


def ratio(numerator: list[float], denominator: list[float], blocks: int, skip: int = 1) -> Ratio:
    """sum(numerator) / sum(denominator) over each of `blocks` equal blocks of paired turns (the first `skip`
    turns, warm-ups, left out): the median and range of the block ratios. Of seconds lists, a throughput
    ratio rate(A) / rate(B) is ratio(seconds B, seconds A)."""
    pairs = list(zip(numerator, denominator))[skip:]
    size = len(pairs) // blocks
    if size < 1:
        raise ValueError(f"{len(pairs)} timed turns cannot make {blocks} blocks")
    values = []
    for block in range(blocks):
        chunk = pairs[block * size:(block + 1) * size]
        values.append(sum(n for n, _ in chunk) / sum(d for _, d in chunk))
    return Ratio(statistics.median(values), min(values), max(values), blocks)
