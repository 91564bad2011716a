"""Run one batch: build the model requests, make one model call, then encode and store each job's
PNGs on a thread pool (off the model's critical path) and end each job on its own.

A failing request never fails its batch-mates: if the batched call raises, each job is run again
alone, so only the request that fails alone is marked failed. Out of device memory, the call is
split in halves and retried (worker.devices); a device error that leaves the device unusable
(illegal memory access, device-side assert) raises DeviceFailure: the worker gives its batch back
and exits.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app import recovery
from app.schemas import fill_sampling, model_sampling_defaults
from app.storage import Storage, new_image_id
from worker.devices import DeviceFailure, DoesNotFit, free_device_memory, is_fatal_device_error, is_oom
from worker.metrics import WorkerMetrics
from worker.png import encode_png, png_text
from worker.resilience import REDIS_DOWN

log = logging.getLogger(__name__)
__all__ = ["BatchRunner", "BatchReleased", "DeviceFailure"]


class BatchReleased(Exception):
    """Raised at a scale boundary once the drain grace is over: the batch's jobs are requeued."""


def request_class(pipeline: object) -> type:
    """The ImageRequest type of a pipeline (the noop pipeline avoids importing torch)."""
    from worker.noop import NoopPipeline

    if isinstance(pipeline, NoopPipeline):
        from worker.noop import ImageRequest
    else:
        from model.pipeline import ImageRequest
    return ImageRequest


def image_requests(make: type, params: dict) -> list:
    """The n model requests of one job (sampling fields already filled): image i uses seed + i."""
    return [make(prompt=params["prompt"], seed=params["seed"] + i, negative_prompt=params["negative_prompt"],
                 cfg=params["guidance_scale"], top_k=params["top_k"], top_p=params["top_p"],
                 temperature=params["temperature"]) for i in range(params["n"])]


@dataclass
class BatchReport:
    """Collects one batch's numbers; the last job to finish writes the batch's log line."""

    job_ids: list[str]
    images: int
    queue_wait_s: list[float]
    model_s: float
    pending: int
    encode_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, encode_s: float = 0.0) -> None:
        with self.lock:
            self.encode_s += encode_s
            self.pending -= 1
            if self.pending:
                return
        wait = max(self.queue_wait_s, default=0.0)
        log.info("batch jobs=%s size=%d images=%d queue_wait_max=%.3fs model=%.3fs encode=%.3fs",
                 ",".join(self.job_ids), len(self.job_ids), self.images, wait, self.model_s, self.encode_s)


def pipeline_sampling(pipeline: object) -> dict:
    """The effective sampling defaults of a loaded pipeline (API names): its model directory's
    "sampling" block (`pipeline.sampling`, from model.model_dir.sampling_defaults) over the
    service's DEFAULT_SAMPLING; ValueError if the directory's values are out of the API's bounds."""
    return model_sampling_defaults(getattr(pipeline, "sampling", None))


class BatchRunner:
    def __init__(self, pipeline, storage: Storage, metrics: WorkerMetrics, conn, encode_threads: int = 2,
                 sampling: dict | None = None):
        self.pipeline = pipeline
        self.storage = storage
        self.metrics = metrics
        self.conn = conn
        self.model_name: str = pipeline.name
        self.sampling = sampling if sampling is not None else pipeline_sampling(pipeline)
        self.make_request = request_class(pipeline)
        self.pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="star-encode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        params = fill_sampling({"prompt": "warm-up", "negative_prompt": "", "n": 1, "seed": 0}, self.sampling)
        self.pipeline.generate(image_requests(self.make_request, params))
        log.info("warm-up generation took %.2fs", time.perf_counter() - t0)

    def run(self, batch: list, finisher) -> None:
        """One model call for `batch` (Running jobs); each job ends through `finisher`."""
        requests, rows = [], {}
        for running in batch:
            rows[running.job.id] = range(len(requests), len(requests) + running.images)
            requests += image_requests(self.make_request, running.params)
        stopped: set[str] = set()
        t0 = time.perf_counter()
        try:
            results = self._generate(requests, self._on_scale(batch, rows, stopped, finisher))
        except BatchReleased:
            return   # the drain grace ran out: the jobs are back on the queue
        except Exception as exc:
            if is_fatal_device_error(exc):
                raise DeviceFailure(f"{type(exc).__name__}: {exc}") from exc
            error = exc
        else:
            error = None
        if error is not None:   # handled outside the except block: solo reruns don't chain tracebacks
            self._after_model_error(batch, finisher, error)
            return
        model_s = time.perf_counter() - t0
        if len(results) != len(requests):   # a bug outside any one request: nothing is published
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(requests)} requests")
        self._dispatch(batch, rows, results, stopped, model_s, finisher)

    def _dispatch(self, batch: list, rows: dict, results: list, stopped: set[str], model_s: float,
                  finisher) -> None:
        self.metrics.observe_batch(len(batch), len(results), model_s)
        self.metrics.observe_gpu_memory(getattr(self.pipeline, "device", "cpu"))
        report = BatchReport([r.job.id for r in batch], len(results), [_queue_wait(r.job) for r in batch],
                             model_s, pending=len(batch))
        for running in batch:
            mine = [results[i] for i in rows[running.job.id]]
            too_large = next((r for r in mine if isinstance(r, DoesNotFit)), None)
            if running.job.id in stopped or any(getattr(r, "canceled", False) for r in mine):
                finisher.finish_canceled(running)
                report.done()
            elif too_large is not None:
                finisher.finish_failed(running, "out_of_memory", too_large.message)
                report.done()
            else:
                running.stage = "encode"
                self.pool.submit(self._store, running, mine, model_s, finisher, report)

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

    def _on_scale(self, batch: list, rows: dict, stopped: set[str], finisher):
        """Progress and cancel flags at each scale boundary; returns every row to stop so far
        (canceled, or re-queued away from this worker)."""
        tokens = {r.job.id: r.token for r in batch}

        def on_scale(k: int, scales: int) -> list[int]:
            if finisher.released:
                raise BatchReleased()
            live = [r.job for r in batch if r.job.id not in stopped]
            try:
                canceled, lost = recovery.scale_boundary(self.conn, live, tokens, k, scales)
            except REDIS_DOWN as exc:   # progress is best-effort; the batch goes on
                log.warning("scale %d/%d: progress not recorded (Redis unavailable: %s)", k, scales, exc)
                canceled = lost = set()
            stopped.update(canceled, lost)
            return [i for job_id in stopped for i in rows[job_id]]
        return on_scale

    def _after_model_error(self, batch: list, finisher, exc: Exception) -> None:
        if len(batch) == 1:
            log.error("job %s failed in the model: %s", batch[0].job.id, exc)
            finisher.finish_failed(batch[0], "model_error", f"{type(exc).__name__}: {exc}",
                                   (type(exc), exc, exc.__traceback__))
            return
        log.warning("batch of %d failed (%s); running each job alone to isolate the failure", len(batch), exc)
        for running in batch:
            self.run([running], finisher)

    def _store(self, running, results: list, model_s: float, finisher, report: BatchReport) -> None:
        """Encode + store one job's PNGs, then mark it finished (runs on the encode pool). If the
        job was taken away from this worker meanwhile, its PNGs are deleted unpublished."""
        t0 = time.perf_counter()
        try:
            images = [self._store_one(running.params, running.params["seed"] + i, result.image)
                      for i, result in enumerate(results)]
        except Exception as exc:
            log.exception("job %s: storing its images failed", running.job.id)
            self._guarded(finisher.finish_failed, running, "storage_error",   # no paths in the answer
                          f"the images could not be stored ({type(exc).__name__}; details in the worker's log)",
                          sys.exc_info())
        else:
            encode_s = time.perf_counter() - t0
            self.metrics.encode_seconds.observe(encode_s)
            self.metrics.images.inc(len(images))
            published = self._guarded(finisher.finish_succeeded, running, {
                "images": images, "prompt_truncated": any(r.prompt_truncated for r in results),
                "model_s": round(model_s, 4), "encode_s": round(encode_s, 4)})
            if not published:
                for image in images:
                    self.storage.delete(image["id"])
        report.done(time.perf_counter() - t0)

    def _store_one(self, params: dict, seed: int, image) -> dict:
        image_id = new_image_id()
        self.storage.put(image_id, encode_png(image, png_text(params, seed, self.model_name)))
        height, width = image.shape[:2]
        return {"id": image_id, "seed": seed, "width": width, "height": height}

    @staticmethod
    def _guarded(finish, running, *args) -> bool:
        try:
            return finish(running, *args) is not False
        except Exception:
            log.exception("job %s: could not record its outcome", running.job.id)
            return False


def _window(on_scale, start: int, length: int):
    """on_scale of the full request list, seen from the sub-list [start, start + length)."""
    def inner(k: int, scales: int) -> list[int]:
        return [i - start for i in on_scale(k, scales) if start <= i < start + length]
    return inner


def _queue_wait(job) -> float:
    if job.started_at and job.enqueued_at:
        return (job.started_at - job.enqueued_at).total_seconds()
    return 0.0
