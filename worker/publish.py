"""Publish: encode a finished job's images as PNGs (parameters in text chunks) and store them, on a
thread pool off the model's critical path, so the next batch's model call overlaps them. The last
job of a batch to be published writes the batch's log line (job ids, size, queue wait, model and
encode time). `job_usage` is what a succeeded job is charged (app.jobs.usage).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from app.schemas import image_seed
from app.storage import Storage, new_image_id
from worker.metrics import WorkerMetrics
from worker.png import encode_png, png_text

log = logging.getLogger(__name__)


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


def job_usage(model_s: float, call_images: int, records: list[dict]) -> dict:
    """A succeeded job's usage: its share of its model call's time, split by images (the call's
    `model_s` x its images / the `call_images` the call started with), its images and pixels."""
    images = len(records)
    share = model_s * images / call_images if call_images else model_s
    return {"model_s": round(share, 6), "images": images, "pixels": sum(r["width"] * r["height"] for r in records)}


class Publisher:
    def __init__(self, storage: Storage, metrics: WorkerMetrics, model_name: str, threads: int = 2):
        self.storage = storage
        self.metrics = metrics
        self.model_name = model_name
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="star-encode")

    def submit(self, task: Callable[[], None]) -> Future:
        """Run task (publish then finish one job) on the encode pool."""
        return self.pool.submit(task)

    def store(self, params: dict, images: list) -> list[dict]:
        """Encode + store one job's images (uint8 [H, W, 3], seed order); their records."""
        records = []
        for i, image in enumerate(images):
            seed = image_seed(params["seed"], i)
            image_id = new_image_id()
            self.storage.put(image_id, encode_png(image, png_text(params, seed, self.model_name)))
            height, width = image.shape[:2]
            records.append({"id": image_id, "seed": seed, "width": width, "height": height})
        self.metrics.images.inc(len(records))
        return records

    def unpublish(self, records: list[dict]) -> None:
        """Delete stored images that will never be published (the job was taken away)."""
        for record in records:
            self.storage.delete(record["id"])

    def close(self) -> None:
        self.pool.shutdown(wait=True)
