"""A non-forking RQ worker that runs jobs in batches.

RQ's own loop (`work()`: registration, suspension, maintenance, signals) dequeues one job and
calls `execute_job`; we then collect more jobs of the same queue (worker.batcher), mark each one
started the way RQ does (execution record, StartedJobRegistry, status), run them as one model
call (worker.runner), and end each job through RQ's own success/failure handling. So every
request stays a real RQ job: `rq info` and the registries tell the truth, results keep their TTLs.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from redis import WatchError
from rq import Queue
from rq.exceptions import DequeueTimeout, InvalidJobOperation
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import now, utcformat
from rq.worker import SimpleWorker, WorkerStatus

from app import queue as q
from worker.batcher import Collector
from worker.health import Health

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job's own failure (its code goes to meta['error'])."""


@dataclass
class Running:
    """A started job: what the runner needs, and what RQ needs to finish it."""

    job: Job
    queue: Queue
    execution: Execution
    params: dict
    images: int


class BatchWorker(SimpleWorker):
    def __init__(self, queue_name: str, *, connection, name: str, runner, health: Health,
                 max_batch: int, max_wait_ms: int, result_ttl: int):
        super().__init__([queue_name], name=name, connection=connection, serializer=q.SERIALIZER,
                         default_result_ttl=result_ttl)
        self.runner = runner
        self.health = health
        self.model = runner.model_name
        self._lock = threading.RLock()   # RQ bookkeeping from the encode threads and the heartbeat
        self._inflight: dict[str, Running] = {}   # started and not yet ended (any batch)
        self._batch: list[Running] = []            # started in the current batch
        self.collector = Collector(images_of=q.job_images, pull=self._pull, start=self._start,
                                   give_back=self._give_back, max_images=max_batch,
                                   max_wait_s=max_wait_ms / 1000.0)
        health.hooks.append(self.beat_jobs)

    # ------------------------------------------------------------ RQ hooks

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.set_state(WorkerStatus.BUSY)   # a SIGTERM now waits for the batch (RQ's warm shutdown)
        self.health.set_state("busy")
        self._batch = []   # filled by _start, so a failure even mid-collect ends every started job
        try:
            batch = self.collector.collect(job)
            if batch:
                self.runner.run(batch, self)
        except Exception as exc:
            log.exception("batch failed outside the model call")
            for running in self._batch:     # jobs already ended are skipped by finish_failed
                self.finish_failed(running, "internal_error", f"worker error: {exc}",
                                   (type(exc), exc, exc.__traceback__))
        finally:
            self.set_state(WorkerStatus.IDLE)
            self.health.set_state("ready")

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """Jobs stay 'started' while heartbeats arrive; a dead worker's jobs are abandoned soon."""
        return max(60, int(6 * self.health.period_s))

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():   # tests run workers in threads
            super()._install_signal_handlers()

    def request_stop(self, signum, frame) -> None:
        self.health.drain_requested = True
        super().request_stop(signum, frame)

    def teardown(self) -> None:
        self.runner.close()   # finish encoding and recording the last batch first
        super().teardown()

    def beat_jobs(self) -> None:
        """RQ heartbeats (worker, execution, job) for every job started and not yet finished."""
        with self._lock:
            for running in list(self._inflight.values()):
                self.maintain_heartbeats(running.job, running.execution)

    # ------------------------------------------------------------ collecting a batch

    def _pull(self, timeout_s: float) -> Job | None:
        try:
            result = self.queue_class.dequeue_any(
                self.queues, timeout_s if timeout_s >= 0.01 else None, connection=self.connection,
                job_class=self.job_class, serializer=self.serializer)
        except DequeueTimeout:
            return None
        return result[0] if result else None

    def _give_back(self, job: Job) -> None:
        q.return_to_queue(self.connection, self.queues[0], job.id)

    def _start(self, job: Job) -> Running | None:
        """Mark a dequeued job started, atomically with respect to a cancel from the API; a job
        canceled meanwhile is dropped, one past its deadline ends as expired."""
        queue = self.queues[0]
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(job.key)
                if job.get_status(refresh=True) != JobStatus.QUEUED:
                    pipe.multi()
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                    pipe.execute()
                    return None
                if q.is_expired(job):
                    pipe.unwatch()
                    self.finish_expired(job, queue)
                    return None
                ttl = self.get_heartbeat_ttl(job)
                pipe.multi()
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.heartbeat(ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                pipe.execute()
            except WatchError:
                return self._start(job)   # the API touched it: look again
        running = Running(job, queue, execution, dict(job.kwargs), q.job_images(job))
        with self._lock:
            self.executions[execution.id] = execution
            self._inflight[job.id] = running
        self._batch.append(running)
        return running

    # ------------------------------------------------------------ ending jobs (any thread)
    # Each ends a started job once: the first call wins, later ones for the same job do nothing.

    def _claim(self, running: Running) -> bool:
        return self._inflight.pop(running.job.id, None) is not None

    def finish_succeeded(self, running: Running, result: dict) -> None:
        job = running.job
        with self._lock:
            if not self._claim(running):
                return
            job.meta.update(model_s=result.get("model_s"), progress=None)
            job.save_meta()
            self._finalize_success(job, running.queue, running.execution, result)
        self._after(job, "succeeded")

    def finish_failed(self, running: Running, code: str, message: str, exc_info=None) -> None:
        job = running.job
        exc_info = exc_info or (JobFailed, JobFailed(f"{code}: {message}"), None)
        with self._lock:
            if not self._claim(running):
                return
            job.meta.update(error={"code": code, "message": message}, progress=None)
            job.save_meta()
            self._finalize_failure(job, running.queue, running.execution, exc_info)
        self._after(job, "failed")

    def finish_canceled(self, running: Running) -> None:
        """A running job canceled at a scale boundary: end its execution and mark it canceled."""
        job = running.job
        with self._lock:
            if not self._claim(running):
                return
            job.ended_at = now()
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=running.execution)
                pipe.hset(job.key, "ended_at", utcformat(job.ended_at))
                pipe.execute()
            try:
                job.cancel()
            except InvalidJobOperation:
                pass   # already canceled
            job.cleanup(job.result_ttl or self.default_result_ttl)
        log.info("job %s canceled while running", job.id)
        self._after(job, "canceled")

    def finish_expired(self, job: Job, queue: Queue) -> None:
        """A job dequeued past its deadline: never run, recorded as a failure with code expired."""
        waited = time.time() - job.enqueued_at.timestamp() if job.enqueued_at else float("nan")
        message = f"waited {waited:.1f}s in the queue, past its deadline"
        with self._lock:
            job.meta.update(error={"code": "expired", "message": message})
            job.save_meta()
            job.ended_at = now()
            self.handle_job_failure(job, queue, exc_string=f"JobExpired: {message}")
            self.connection.lrem(queue.intermediate_queue_key, 1, job.id)
        log.info("job %s expired (%s)", job.id, message)
        self._after(job, "expired")

    def _after(self, job: Job, status: str) -> None:
        q.clear_cancel_flag(self.connection, job.id)
        ended, enqueued, started = job.ended_at, job.enqueued_at, job.started_at
        latency = (ended - enqueued).total_seconds() if ended and enqueued else None
        wait = (started - enqueued).total_seconds() if started and enqueued and status != "expired" else None
        q.record_finished(self.connection, self.model, status, latency, wait)
        self.runner.metrics.jobs.labels(status).inc()
