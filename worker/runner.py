"""Run: one model call for a batch of started jobs, and a typed outcome for each job.

`BatchRunner.run(batch, on_scale)` builds the model requests (worker.sampling), calls the pipeline
once and returns one outcome per job, in order: Succeeded (its images, not yet stored), Failed
(a code and a message), Canceled, or Released (taken away from this worker, or the whole batch
given back when the drain grace ran out). It never talks to Redis: progress and cancels reach it
through `on_scale(k, scales, live_job_ids)`, called after each scale, which answers the jobs to
stop now ({job id: "canceled" | "lost"}) or raises BatchReleased.

A job whose sampler the model cannot run ("head" on a model without a sampler head: the API
refuses it up front when the registry tells it the model, but a job queued before then reaches
the worker) fails alone with `invalid_request` before the call; jobs with different samplers
otherwise share the call (the model runs head and plain rows side by side).

A failing request never fails its batch-mates: if the batched call raises, each job is run again
alone, so only the request that fails alone fails. Out of device memory, the call is split in
halves and retried (worker.devices); a device error that leaves the device unusable (illegal
memory access, device-side assert) raises DeviceFailure: the worker gives its batch back and exits.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from model.request import ImageRequest, ImageResult
from worker.devices import DeviceFailure, DoesNotFit, free_device_memory, is_fatal_device_error, is_oom
from worker.metrics import WorkerMetrics
from worker.sampling import image_requests

log = logging.getLogger(__name__)
__all__ = ["BatchRunner", "BatchReleased", "DeviceFailure", "Work", "Outcome", "Succeeded", "Failed",
           "Canceled", "Released", "ScaleCallback"]


class BatchReleased(Exception):
    """Raised by on_scale once the drain grace is over: the batch's jobs go back to the queue."""


@dataclass(frozen=True)
class Work:
    """One started job as the model sees it."""

    job_id: str
    params: dict      # the request, every field filled (API names)


@dataclass(frozen=True)
class Succeeded:
    job_id: str
    results: list[ImageResult]   # one per image, seed order
    model_s: float               # wall time of the model call it ran in
    call_images: int = 0         # images that call started with (its share of model_s: usage)


@dataclass(frozen=True)
class Failed:
    job_id: str
    code: str                    # model_error, out_of_memory, invalid_request
    message: str
    error: BaseException | None = None


@dataclass(frozen=True)
class Canceled:
    job_id: str


@dataclass(frozen=True)
class Released:
    job_id: str
    reason: str                  # "lost": re-queued away from this worker; "drain": the grace ran out


Outcome = Succeeded | Failed | Canceled | Released
ScaleCallback = Callable[[int, int, list[str]], Mapping[str, str]]


class BatchRunner:
    def __init__(self, pipeline, metrics: WorkerMetrics):
        self.pipeline = pipeline
        self.metrics = metrics

    def warm_up(self, defaults: dict) -> None:
        t0 = time.perf_counter()
        self.pipeline.generate(image_requests({"prompt": "warm-up", "negative_prompt": "", "n": 1, "seed": 0,
                                               **defaults}))
        log.info("warm-up generation took %.2fs", time.perf_counter() - t0)

    def run(self, batch: Sequence[Work], on_scale: ScaleCallback) -> list[Outcome]:
        """One model call for `batch`; one outcome per job, in order."""
        refused = {work.job_id: failed for work in batch if (failed := self._refuse(work)) is not None}
        runnable = [work for work in batch if work.job_id not in refused]
        ran = iter(self._run(runnable, on_scale) if runnable else [])
        return [refused[work.job_id] if work.job_id in refused else next(ran) for work in batch]

    def _refuse(self, work: Work) -> Failed | None:
        """A Failed outcome for a job the model cannot run as asked (its sampler), else None."""
        try:
            self.pipeline.resolve_sampler(work.params.get("sampler"))
        except ValueError as exc:
            log.warning("job %s refused: %s", work.job_id, exc)
            return Failed(work.job_id, "invalid_request", str(exc))
        return None

    def _run(self, batch: Sequence[Work], on_scale: ScaleCallback) -> list[Outcome]:
        requests: list[ImageRequest] = []
        rows: dict[str, range] = {}
        for work in batch:
            mine = image_requests(work.params)
            rows[work.job_id] = range(len(requests), len(requests) + len(mine))
            requests += mine
        stopped: dict[str, str] = {}
        t0 = time.perf_counter()
        try:
            results = self._generate(requests, self._rows_to_stop(batch, rows, stopped, on_scale))
        except BatchReleased:
            return [Released(work.job_id, "drain") for work in batch]
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise DeviceFailure(f"{type(exc).__name__}: {exc}") from exc
            error: Exception | None = exc
        else:
            error = None
        if error is not None:   # handled outside the except block: solo reruns don't chain tracebacks
            return self._after_model_error(batch, on_scale, error)
        model_s = time.perf_counter() - t0
        if len(results) != len(requests):   # a bug outside any one request: nothing is published
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(requests)} requests")
        self.metrics.observe_batch(len(batch), len(results), model_s)
        self.metrics.observe_gpu_memory(getattr(self.pipeline, "device", "cpu"))
        return [self._outcome(work.job_id, [results[i] for i in rows[work.job_id]], stopped, model_s, len(requests))
                for work in batch]

    @staticmethod
    def _outcome(job_id: str, results: list, stopped: dict[str, str], model_s: float, call_images: int) -> Outcome:
        too_large = next((r for r in results if isinstance(r, DoesNotFit)), None)
        if stopped.get(job_id) == "lost":
            return Released(job_id, "lost")
        if job_id in stopped or any(r.canceled for r in results):
            return Canceled(job_id)
        if too_large is not None:
            return Failed(job_id, "out_of_memory", too_large.message)
        return Succeeded(job_id, results, model_s, call_images)

    def _generate(self, requests: list, on_scale, start: int = 0) -> list:
        """The model call; out of device memory, the requests are split in halves and each half
        retried (images do not depend on their batch); one image that still does not fit alone
        gets a DoesNotFit result."""
        try:
            return self.pipeline.generate(requests, on_scale=_window(on_scale, start, len(requests)))
        except Exception as exc:
            if not is_oom(exc):
                raise
        free_device_memory()   # outside the except block: the traceback no longer pins tensors
        if len(requests) == 1:
            device = getattr(self.pipeline, "device", "the device")
            size = getattr(self.pipeline, "image_size", "?")
            log.error("one %spx image does not fit in the memory of %s", size, device)
            return [DoesNotFit(f"out of device memory: one {size}x{size} image does not fit on {device} even "
                               f"alone (in a batch of one); this worker cannot make it at that size")]
        half = len(requests) // 2
        log.warning("out of device memory with %d images in one call; retrying as %d + %d",
                    len(requests), half, len(requests) - half)
        return (self._generate(requests[:half], on_scale, start)
                + self._generate(requests[half:], on_scale, start + half))

    @staticmethod
    def _rows_to_stop(batch: Sequence[Work], rows: dict[str, range], stopped: dict[str, str],
                      on_scale: ScaleCallback) -> Callable[[int, int], list[int]]:
        """The pipeline's on_scale: asks the worker's callback about the jobs still running and
        returns every row to stop so far (canceled, or re-queued away from this worker)."""
        def rows_to_stop(k: int, scales: int) -> list[int]:
            live = [work.job_id for work in batch if work.job_id not in stopped]
            stopped.update(on_scale(k, scales, live))
            return [i for job_id in stopped for i in rows[job_id]]
        return rows_to_stop

    def _after_model_error(self, batch: Sequence[Work], on_scale: ScaleCallback, exc: Exception) -> list[Outcome]:
        if len(batch) == 1:
            log.error("job %s failed in the model: %s", batch[0].job_id, exc)
            return [Failed(batch[0].job_id, "model_error", f"{type(exc).__name__}: {exc}", exc)]
        log.warning("batch of %d failed (%s); running each job alone to isolate the failure", len(batch), exc)
        return [outcome for work in batch for outcome in self._run([work], on_scale)]


def _window(on_scale, start: int, length: int):
    """on_scale of the full request list, seen from the sub-list [start, start + length)."""
    def inner(k: int, scales: int) -> list[int]:
        return [i - start for i in on_scale(k, scales) if start <= i < start + length]
    return inner
