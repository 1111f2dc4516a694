"""How many CPU threads a training run (of RAR or of the tokenizer) uses while it runs.

With another process busy on one of the cores, torch's OpenMP threads wait for each other at
every parallel region, and a step of a small model takes several times as long as on the idle
machine; with one thread fewer it takes about the run's share of the machine (figures in
BENCHMARKS.md). `ThreadGovernor` watches the median step time over windows of steps: when a
window is much slower than the best seen with the current count, after the second window, and
every `reprobe` windows, it tries the next count for one window and keeps whichever was faster. Only speed changes: the
training losses are bit-identical with 1 and 2 threads (tests/test_train.py).
"""
from __future__ import annotations

import math
import statistics

import torch


class ThreadGovernor:
    def __init__(self, max_threads: int, window: int = 10, reprobe: int = 30, slowdown: float = 1.5,
                 set_threads=torch.set_num_threads):
        self.choices = sorted({max_threads, max(1, max_threads // 2), 1}, reverse=True)  # e.g. [2, 1]
        self.window, self.reprobe, self.slowdown, self._set = window, reprobe, slowdown, set_threads
        self.current, self.probing_from = max_threads, None
        self.latest: dict[int, float] = {}  # threads -> median step seconds of its latest window
        self.best: dict[int, float] = {}
        self.times: list[float] = []
        self.windows = 0
        self._set(self.current)

    def step_done(self, seconds: float) -> None:
        """Record one step's wall time; may change the thread count for the next steps."""
        self.times.append(seconds)
        if len(self.times) < self.window:
            return
        median, self.times = statistics.median(self.times), []
        self.latest[self.current] = median
        self.best[self.current] = min(self.best.get(self.current, math.inf), median)
        self.windows += 1
        if self.probing_from is not None:  # a probe window ended: keep the faster of the two
            before, self.probing_from = self.probing_from, None
            keep = min((before, self.current), key=lambda n: self.latest[n])
            self.best[keep] = self.latest[keep]  # the new normal: no probe at every other window
            self._switch(keep)
            return
        slowed = median > self.slowdown * self.best[self.current]
        due = self.windows == 2 or self.windows % self.reprobe == 0  # early (load from the start), then now and then
        if len(self.choices) > 1 and (slowed or due):
            self.probing_from = self.current
            self._switch(self.choices[(self.choices.index(self.current) + 1) % len(self.choices)])

    def _switch(self, threads: int) -> None:
        if threads != self.current:
            self.current = threads
            self._set(threads)
