"""The worker's own Prometheus metrics, served on STAR_METRICS_HOST at STAR_METRICS_PORT (+ N for device
cuda:N, app.settings.worker_metrics_port; 0 disables the server).

star_worker_state (Enum: starting, ready, busy, draining, failed) is what `star healthcheck worker`
reads. Job latency/queue-wait histograms are exported by the API (see app/metrics.py).
"""
from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info, start_http_server

log = logging.getLogger(__name__)
STATES = ["starting", "ready", "busy", "draining", "failed"]
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.state = Enum("star_worker_state", "Worker state.", states=STATES, registry=r)
        self.info = Info("star_worker", "Model served by this worker.", registry=r)
        self.batches = Counter("star_worker_batches", "Model calls (one per batch).", registry=r)
        self.batch_images = Histogram("star_worker_batch_images", "Images per model call.",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.batch_jobs = Histogram("star_worker_batch_jobs", "Jobs (requests) per model call.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.model_seconds = Histogram("star_worker_model_seconds", "Wall time of one model call.",
                                       buckets=SECONDS_BUCKETS, registry=r)
        self.encode_seconds = Histogram("star_worker_encode_seconds", "PNG encode + store time per job.",
                                        buckets=SECONDS_BUCKETS, registry=r)
        self.images_per_second = Gauge("star_worker_images_per_second",
                                       "Images per second of model time in the last batch.", registry=r)
        self.images = Counter("star_worker_images", "Images generated and stored.", registry=r)
        self.jobs = Counter("star_worker_jobs", "Jobs finished, by outcome.", ["outcome"], registry=r)
        self.requeues = Counter("star_worker_requeues", "Running jobs this worker gave back to the queue or "
                                "failed as worker_lost (reaper of dead workers' jobs, drain, device error).",
                                ["reason"], registry=r)
        self.gpu_memory = Gauge("star_worker_gpu_memory_bytes", "CUDA memory of this process.", ["kind"], registry=r)
        self.state.state("starting")

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Listen on addr:port (nothing for port 0). OSError when the port is taken."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
            log.info("worker metrics on %s:%d/metrics", addr, port)

    def observe_batch(self, jobs: int, images: int, model_s: float) -> None:
        self.batches.inc()
        self.batch_jobs.observe(jobs)
        self.batch_images.observe(images)
        self.model_seconds.observe(model_s)
        if model_s > 0:
            self.images_per_second.set(images / model_s)

    def observe_gpu_memory(self, device: Any) -> None:
        """Allocated/reserved/peak CUDA memory, only when the model runs on CUDA."""
        if getattr(device, "type", str(device)) != "cuda":
            return
        import torch

        self.gpu_memory.labels("allocated").set(torch.cuda.memory_allocated(device))
        self.gpu_memory.labels("reserved").set(torch.cuda.memory_reserved(device))
        self.gpu_memory.labels("peak").set(torch.cuda.max_memory_allocated(device))
