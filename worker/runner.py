"""Run one batch: build the model requests, make one model call, then encode and store each job's
PNGs on a thread pool (off the model's critical path) and end each job on its own.

A failing request never fails its batch-mates: if the batched call raises, each job is run again
alone, so only the request that fails alone is marked failed.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from app import queue as q
from app.storage import Storage, new_image_id
from worker.metrics import WorkerMetrics
from worker.png import encode_png, png_text

log = logging.getLogger(__name__)


def request_class(pipeline: object) -> type:
    """The ImageRequest type of a pipeline (the noop pipeline avoids importing torch)."""
    from worker.noop import NoopPipeline

    if isinstance(pipeline, NoopPipeline):
        from worker.noop import ImageRequest
    else:
        from model.pipeline import ImageRequest
    return ImageRequest


def image_requests(make: type, params: dict) -> list:
    """The n model requests of one job: image i uses seed + i."""
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


class BatchRunner:
    def __init__(self, pipeline, storage: Storage, metrics: WorkerMetrics, conn, encode_threads: int = 2):
        self.pipeline = pipeline
        self.storage = storage
        self.metrics = metrics
        self.conn = conn
        self.model_name: str = pipeline.name
        self.make_request = request_class(pipeline)
        self.pool = ThreadPoolExecutor(encode_threads, thread_name_prefix="star-encode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        self.pipeline.generate([self.make_request(prompt="warm-up", seed=0)])
        log.info("warm-up generation took %.2fs", time.perf_counter() - t0)

    def run(self, batch: list, finisher) -> None:
        """One model call for `batch` (Running jobs); each job ends through `finisher`."""
        requests, rows = [], {}
        for running in batch:
            rows[running.job.id] = range(len(requests), len(requests) + running.images)
            requests += image_requests(self.make_request, running.params)
        canceled: set[str] = set()
        t0 = time.perf_counter()
        try:
            results = self.pipeline.generate(requests, on_scale=self._on_scale(batch, rows, canceled))
        except Exception as exc:
            error = exc
        else:
            error = None
        if error is not None:   # handled outside the except block: solo reruns don't chain tracebacks
            self._after_model_error(batch, finisher, error)
            return
        model_s = time.perf_counter() - t0
        if len(results) != len(requests):
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(requests)} requests")
        self.metrics.observe_batch(len(batch), len(requests), model_s)
        self.metrics.observe_gpu_memory(getattr(self.pipeline, "device", "cpu"))
        report = BatchReport([r.job.id for r in batch], len(requests), [_queue_wait(r.job) for r in batch],
                             model_s, pending=len(batch))
        for running in batch:
            mine = [results[i] for i in rows[running.job.id]]
            if running.job.id in canceled or any(result.canceled for result in mine):
                finisher.finish_canceled(running)
                report.done()
            else:
                self.pool.submit(self._store, running, mine, model_s, finisher, report)

    def _on_scale(self, batch: list, rows: dict, canceled: set[str]):
        def on_scale(k: int, scales: int) -> list[int]:
            live = [r.job for r in batch if r.job.id not in canceled]
            newly = q.scale_boundary(self.conn, live, k, scales)
            canceled.update(newly)
            return [i for job_id in newly for i in rows[job_id]]
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
        """Encode + store one job's PNGs, then mark it finished (runs on the encode pool)."""
        t0 = time.perf_counter()
        try:
            images = [self._store_one(running.params, running.params["seed"] + i, result.image)
                      for i, result in enumerate(results)]
        except Exception as exc:
            log.exception("job %s: storing its images failed", running.job.id)
            self._guarded(finisher.finish_failed, running, "storage_error", f"{type(exc).__name__}: {exc}",
                          sys.exc_info())
        else:
            encode_s = time.perf_counter() - t0
            self.metrics.encode_seconds.observe(encode_s)
            self.metrics.images.inc(len(images))
            self._guarded(finisher.finish_succeeded, running, {
                "images": images, "prompt_truncated": any(r.prompt_truncated for r in results),
                "model_s": round(model_s, 4), "encode_s": round(encode_s, 4)})
        report.done(time.perf_counter() - t0)

    def _store_one(self, params: dict, seed: int, image) -> dict:
        image_id = new_image_id()
        self.storage.put(image_id, encode_png(image, png_text(params, seed, self.model_name)))
        height, width = image.shape[:2]
        return {"id": image_id, "seed": seed, "width": width, "height": height}

    @staticmethod
    def _guarded(finish, running, *args) -> None:
        try:
            finish(running, *args)
        except Exception:
            log.exception("job %s: could not record its outcome", running.job.id)


def _queue_wait(job) -> float:
    if job.started_at and job.enqueued_at:
        return (job.started_at - job.enqueued_at).total_seconds()
    return 0.0
