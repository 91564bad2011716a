"""Batching policy: after taking one job, take further queued jobs of the same queue (same model and
size, hence compatible) until the batch holds `max_images` images or `max_wait_s` has passed since
the first job was taken.

The policy is pure: the worker passes in how to pull the next job, how to start one (which may
refuse it: expired or canceled meanwhile) and how to give back one that does not fit.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

J = TypeVar("J")  # a dequeued job
S = TypeVar("S")  # a started job


class Collector(Generic[J, S]):
    def __init__(self, *, images_of: Callable[[J], int], pull: Callable[[float], J | None],
                 start: Callable[[J], S | None], give_back: Callable[[J], None],
                 max_images: int, max_wait_s: float, clock: Callable[[], float] = time.monotonic):
        self.images_of = images_of
        self.pull = pull            # pull(timeout_s): the next job, waiting up to timeout_s (0: don't wait)
        self.start = start          # start(job): the started job, or None if it must not run
        self.give_back = give_back  # give_back(job): return a job that does not fit to the queue front
        self.max_images = max_images
        self.max_wait_s = max_wait_s
        self.clock = clock

    def collect(self, first: J) -> list[S]:
        """Start `first` and as many further jobs as fit; returns the started jobs in order.

        A job that would overflow the batch goes back to the front of its queue, unless the batch
        is still empty (a request larger than max_images runs alone)."""
        deadline = self.clock() + self.max_wait_s
        batch: list[S] = []
        images = 0
        job: J | None = first
        while job is not None:
            n = self.images_of(job)
            if batch and images + n > self.max_images:
                self.give_back(job)
                break
            started = self.start(job)
            if started is not None:
                batch.append(started)
                images += n
            if images >= self.max_images:
                break
            job = self.pull(max(0.0, deadline - self.clock()))
        return batch
