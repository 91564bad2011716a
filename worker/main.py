"""`worker.main:main` (`star worker`, `python -m worker`): load the model once, warm up, then take
jobs from the model's lane queues (highest lane first) in batches until SIGTERM/SIGINT: take no
more jobs, finish the batch within STAR_DRAIN_GRACE_S (else put its jobs back on the queue), exit 0.
The stop is bounded whatever Redis does (worker.stopping): a second signal, or Redis still
unreachable 10 s after the grace, and the jobs not recorded are left for the reaper; a process
still hung 5 s later exits 4.

States: starting (loading, warming up) -> ready <-> busy -> draining -> gone; `failed` if the
model cannot be loaded (exit 1) or a device error left the device unusable (its jobs go back to
the queue; exit 3, for the supervisor to start a fresh process). A metrics port already taken, or
an S3 store (STAR_STORAGE_URL) that cannot be written, is exit 1 with a message, before the model loads.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket

from app.jobs.lanes import lane_names
from app.jobs.rq_adapter import connect, queue_name
from app.jobs.workers import WorkerEntry
from app.storage import Storage
from app.stores import open_storage
from app.storage_s3 import StorageUnavailable
from worker.health import Health
from worker.metrics import WorkerMetrics
from worker.noop import NoopPipeline
from worker.publish import Publisher
from worker.rq_worker import BatchWorker
from worker.runner import BatchRunner
from worker.sampling import GUIDANCE_STOP, guidance_stop_default, has_sampler_head, job_defaults, model_defaults
from worker.settings import WorkerSettings
from worker.speed import prepare_model

log = logging.getLogger("worker")
EXIT_DEVICE_FAILURE = 3
EXIT_METRICS_PORT = 1
EXIT_STORAGE = 1

OPTIONS = {  # flag -> setting (each overrides its STAR_* variable)
    "--model": "model", "--redis-url": "redis_url", "--device": "device", "--dtype": "dtype",
    "--max-batch": "max_batch", "--max-wait-ms": "max_wait_ms", "--metrics-host": "metrics_host",
    "--metrics-port": "metrics_port", "--name": "name", "--storage-dir": "storage_dir",
    "--storage-url": "storage_url", "--log-level": "log_level",
}


def parse_settings(argv: list[str] | None) -> WorkerSettings:
    parser = argparse.ArgumentParser(
        prog="star worker", description="Run one STAR worker. Every option overrides its STAR_* "
        "environment variable (e.g. --max-batch overrides STAR_MAX_BATCH).")
    for flag, name in OPTIONS.items():
        info = WorkerSettings.model_fields[name]
        parser.add_argument(flag, dest=name, default=None, help=f"{info.description} (STAR_{name.upper()})")
    args = parser.parse_args(argv)
    return WorkerSettings(**{k: v for k, v in vars(args).items() if v is not None})


def load_pipeline(settings: WorkerSettings):
    """`noop[:SIZE[:SCALE_MS]]` (worker.noop), else model.pipeline.StarPipeline.load(...)."""
    if settings.model == "noop" or settings.model.startswith("noop:"):
        return NoopPipeline.from_spec(settings.model)
    from model.pipeline import StarPipeline

    return StarPipeline.load(settings.model, device=settings.device, dtype=settings.dtype,
                             trust_pickle=settings.trust_pickle)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(settings)


def run(settings: WorkerSettings, pipeline=None, burst: bool = False) -> int:
    """Run a worker until stopped (or, with burst, until its queue is empty); `pipeline`
    (already loaded) is for tests and benchmarks. Once a stop is signalled, the process exits within
    its bounds (worker.stopping), even after this returns: call it as the process's main."""
    metrics = WorkerMetrics()
    try:   # before the model loads: a worker that cannot start says so at once
        metrics.serve(settings.metrics_listen_port, settings.metrics_host)
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%d: %s. Another process holds it (another worker on this host "
                  "with the same STAR_METRICS_PORT and device?): give each worker its own STAR_METRICS_PORT "
                  "(--metrics-port), or 0 to disable its metrics", settings.metrics_host,
                  settings.metrics_listen_port, exc.strerror or exc)
        return EXIT_METRICS_PORT
    try:   # a store that cannot be written would fail every job: say so now, and do not register
        storage = open_storage(settings, check=True)
    except StorageUnavailable as exc:
        log.error("%s", exc)
        return EXIT_STORAGE
    conn = connect(settings.redis_url, socket_timeout=None)
    name = settings.name or f"{socket.gethostname()}.{os.getpid()}"
    entry = WorkerEntry(name=name, model=settings.model, state="starting", max_batch=settings.max_batch,
                        max_wait_ms=settings.max_wait_ms, host=socket.gethostname(), pid=os.getpid())
    health = Health(conn, entry, settings.heartbeat_s, metrics, deadline_s=settings.worker_deadline_s,
                    grace_s=settings.drain_grace_s)
    health.start()
    health.shutdown.start_watchdog()
    previous = _drain_on_signals(health)   # until RQ installs its own handlers
    try:
        return _serve(settings, conn, health, metrics, storage, pipeline, burst)
    finally:
        _restore(previous)
        health.stop()
        health.shutdown.disarm()


def _serve(settings: WorkerSettings, conn, health: Health, metrics: WorkerMetrics, storage: Storage, pipeline,
           burst: bool) -> int:
    try:
        worker = _prepare(settings, conn, health, metrics, storage, pipeline)
    except Exception:
        log.exception("worker %s: could not start", health.entry.name)
        health.set_state("failed")
        return 1
    if health.drain_requested:
        log.info("worker %s: stop requested while starting", health.entry.name)
        worker.publisher.close()
        return 0
    health.set_state("ready")
    worker.work(burst=burst, logging_level=settings.log_level.upper())
    if worker.fatal is not None:
        return EXIT_DEVICE_FAILURE
    return 0 if (health.drain_requested or burst) else 1


def _prepare(settings: WorkerSettings, conn, health: Health, metrics: WorkerMetrics, storage: Storage,
             pipeline) -> BatchWorker:
    pipeline = pipeline or load_pipeline(settings)
    entry = health.entry
    settings = prepare_model(settings, pipeline)   # STAR_MAX_BATCH_AUTO, STAR_COMPILE (worker/speed.py)
    entry.max_batch = settings.max_batch
    entry.model, entry.size, entry.queue = pipeline.name, pipeline.image_size, queue_name(pipeline.name)
    entry.device = str(getattr(pipeline, "device", ""))
    entry.sampling = model_defaults(pipeline)   # what requests without sampling fields get
    entry.example_prompts = list(getattr(pipeline, "example_prompts", None) or [])   # shown by GET /models
    entry.sampler_head = has_sampler_head(pipeline)   # whether requests may ask for sampler "head"
    entry.scales = len(pipeline.patch_nums) if getattr(pipeline, "patch_nums", None) else None
    entry.guidance_stop_scale = guidance_stop_default(settings.guidance_stop_scale, entry.scales)
    metrics.info.info({"model": pipeline.name, "size": str(pipeline.image_size), "device": entry.device,
                       "max_batch": str(settings.max_batch), "max_wait_ms": str(settings.max_wait_ms)})
    health.publish()
    runner = BatchRunner(pipeline, metrics)
    publisher = Publisher(storage, metrics, pipeline.name, settings.encode_threads)
    if settings.warmup:
        runner.warm_up(entry.sampling)
    log.info("worker %s: model %s (%dpx) on %s; queue %s; batches of up to %d images, %d ms wait; "
             "sampling defaults %s; sampler head: %s", entry.name, pipeline.name, pipeline.image_size, entry.device,
             entry.queue, settings.max_batch, settings.max_wait_ms, entry.sampling,
             "yes (sampler auto = head)" if entry.sampler_head else "no (sampler auto = plain)")
    return BatchWorker(lane_names(entry.queue), connection=conn, name=entry.name, runner=runner, publisher=publisher,
                       health=health, sampling={**job_defaults(pipeline), GUIDANCE_STOP: entry.guidance_stop_scale}, max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                       result_ttl=settings.result_ttl_s, deadline_s=settings.worker_deadline_s,
                       max_requeues=settings.max_requeues)


def _drain_on_signals(health: Health) -> dict:
    def request_drain(signum, frame):
        health.shutdown.signal()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request_drain)
        except ValueError:   # not the main thread (tests running a worker in a thread)
            pass
    return previous


def _restore(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)
