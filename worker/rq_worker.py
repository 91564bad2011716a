"""A non-forking RQ worker that runs jobs in batches.

RQ's own loop (`work()`: registration, suspension, maintenance, signals) dequeues one job and
calls `execute_job`; we then collect more jobs of the same queue (worker.batcher), mark each one
started the way RQ does (execution record, StartedJobRegistry, status) plus an owner token
(app.recovery), run them as one model call (worker.runner), and end each job through RQ's own
success/failure handling once its owner token is claimed. So every request stays a real RQ job:
`rq info` and the registries tell the truth, results keep their TTLs, and a job re-queued away
from this worker (presumed dead) is never recorded twice.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import WatchError
from rq import Queue
from rq.exceptions import DequeueTimeout, InvalidJobOperation
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.utils import as_text, now, utcformat
from rq.worker import WorkerStatus

from app import queue as q
from app import recovery
from app.schemas import SAMPLING_FIELDS, fill_sampling
from worker.batcher import Collector
from worker.health import Health
from worker.resilience import REDIS_DOWN, RedisTolerant, retry_redis
from worker.runner import DeviceFailure

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
    token: str = ""          # owner token (app.recovery)
    stage: str = "model"     # model -> encode (its images are being stored)
    ending: bool = False     # an outcome is being recorded (or it was released)


class BatchWorker(RedisTolerant):
    def __init__(self, queue_name: str, *, connection, name: str, runner, health: Health,
                 max_batch: int, max_wait_ms: int, result_ttl: int, deadline_s: float = 30.0,
                 max_requeues: int = 2):
        super().__init__([queue_name], name=name, connection=connection, serializer=q.SERIALIZER,
                         default_result_ttl=result_ttl)
        self.runner = runner
        self.health = health
        self.model = runner.model_name
        self.deadline_s = deadline_s
        self.max_requeues = max_requeues
        self.fatal: BaseException | None = None   # a device error: the process must be replaced
        self.released = False                      # the drain grace passed: the batch was put back
        self._lock = threading.RLock()   # RQ bookkeeping from the encode threads and the heartbeat
        self._inflight: dict[str, Running] = {}   # started and not yet ended (any batch)
        self._batch: list[Running] = []            # started in the current batch
        self.collector = Collector(images_of=q.job_images, pull=self._pull, start=self._start,
                                   give_back=self._give_back, max_images=max_batch,
                                   max_wait_s=max_wait_ms / 1000.0)
        health.hooks += [self.beat_jobs, self.reap]
        health.grace_hooks.append(self.release_after_grace)

    # ------------------------------------------------------------ RQ hooks

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.set_state(WorkerStatus.BUSY)   # a SIGTERM now waits for the batch (RQ's warm shutdown)
        self.health.set_state("busy")
        self._batch = []   # filled by _start, so a failure even mid-collect ends every started job
        try:
            batch = self.collector.collect(job)
            if batch:
                self.runner.run(batch, self)
        except DeviceFailure as exc:
            self._fail_worker(exc)
        except REDIS_DOWN as exc:
            log.warning("batch interrupted by a Redis outage (%s); its jobs go back to the queue", exc)
        except Exception as exc:
            log.exception("batch failed outside the model call")
            for running in self._batch:     # jobs already ended are skipped by finish_failed
                self.finish_failed(running, "internal_error", f"worker error ({type(exc).__name__}; "
                                   "details in the worker's log)", (type(exc), exc, exc.__traceback__))
        finally:
            self._release([r for r in self._batch if r.stage == "model"], count=False, reason="batch abandoned")
            self.set_state(WorkerStatus.IDLE)
            if self.fatal is None:
                self.health.set_state("ready")

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ fails a started job whose execution heartbeat is older than this; the reaper acts
        well before (app.recovery.rq_execution_ttl)."""
        return recovery.rq_execution_ttl(self.deadline_s)

    def run_maintenance_tasks(self) -> None:
        """Our reaper first: RQ's own cleanup would fail abandoned jobs that we re-queue."""
        try:
            self.reap()
            if recovery.redis_uptime(self.connection) < self.deadline_s:
                return   # Redis just restarted: let live workers re-register before RQ judges them
        except REDIS_DOWN as exc:
            log.warning("maintenance skipped (Redis unavailable): %s", exc)
            return
        super().run_maintenance_tasks()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is threading.main_thread():   # tests run workers in threads
            super()._install_signal_handlers()

    def request_stop(self, signum, frame) -> None:
        self.health.drain_requested = True
        super().request_stop(signum, frame)

    def teardown(self) -> None:
        self.runner.close()   # finish encoding and recording the last batch first
        self._release(list(self._inflight.values()), count=False, reason="worker stopped")
        super().teardown()

    # ------------------------------------------------------------ heartbeat thread

    def beat_jobs(self) -> None:
        """RQ heartbeats (worker, execution, job) for every job started and not yet finished."""
        with self._lock:
            for running in list(self._inflight.values()):
                self.maintain_heartbeats(running.job, running.execution)

    def reap(self) -> None:
        """Re-queue the jobs of dead workers (at most one reaper acts per heartbeat period)."""
        for outcome in recovery.reap(self.connection, max_requeues=self.max_requeues,
                                     deadline_s=self.deadline_s, lock_s=self.health.period_s):
            self.runner.metrics.requeues.labels(f"reaper_{outcome.action}").inc()

    def release_after_grace(self) -> None:
        """The drain grace is over and the batch still runs: put its jobs back and stop it."""
        stuck = [r for r in list(self._inflight.values()) if r.stage == "model"]
        if stuck:
            log.warning("drain grace over; putting %d running job(s) back on the queue", len(stuck))
            self.released = True
            self._release(stuck, count=False, reason="drain grace over")

    # ------------------------------------------------------------ collecting a batch

    def _pull(self, timeout_s: float) -> Job | None:
        if self.health.drain_requested:
            return None   # a draining worker takes nothing more
        try:
            result = self.queue_class.dequeue_any(
                self.queues, timeout_s if timeout_s >= 0.01 else None, connection=self.connection,
                job_class=self.job_class, serializer=self.serializer)
        except (DequeueTimeout, *REDIS_DOWN):
            return None
        return result[0] if result else None

    def _give_back(self, job: Job) -> None:
        retry_redis(lambda: q.return_to_queue(self.connection, self.queues[0], job.id), f"job {job.id}: give back")

    def _start(self, job: Job) -> Running | None:
        try:
            running = retry_redis(lambda: self._start_once(job), f"job {job.id}: start")
        except REDIS_DOWN:
            return None   # left in RQ's intermediate list: the reaper puts it back
        if running is not None:
            self._batch.append(running)
        return running

    def _start_once(self, job: Job) -> Running | None:
        """Mark a dequeued job started, atomically with respect to a cancel from the API and to
        the reaper; a job canceled meanwhile is dropped, one past its deadline ends as expired.
        Sampling fields the request left out get the model's defaults, recorded in meta
        `sampling` with the job's start (GET /jobs/{id} shows what runs)."""
        queue, token = self.queues[0], recovery.new_token()
        with self.connection.pipeline() as pipe:
            try:
                pipe.watch(job.key)
                # One round trip for the reads, after the WATCH (a change since still aborts the EXEC).
                with self.connection.pipeline(transaction=False) as reads:
                    reads.lpos(queue.intermediate_queue_key, job.id)
                    reads.hmget(job.key, ["status", "meta"])
                    position, (status, meta) = reads.execute()
                if position is None:
                    pipe.unwatch()
                    return None   # the reaper put it back on the queue meanwhile
                if status is None or as_text(status) != JobStatus.QUEUED.value:   # canceled, or its record is gone
                    pipe.multi()
                    pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                    pipe.execute()
                    return None
                job._status = JobStatus.QUEUED   # what get_status(refresh=True) would have set
                job.meta = q.SERIALIZER.loads(meta) if meta else {}
                if q.is_expired(job):
                    pipe.unwatch()
                    self.finish_expired(job, queue)
                    return None
                ttl = self.get_heartbeat_ttl(job)
                params = fill_sampling(dict(job.kwargs), self.runner.sampling)   # the model's defaults
                job.meta["sampling"] = {name: params[name] for name in SAMPLING_FIELDS}   # what runs (read_job)
                pipe.multi()
                execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
                self.heartbeat(ttl, pipeline=pipe)
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.hset(job.key, "meta", q.SERIALIZER.dumps(job.meta))
                recovery.own(pipe, job, token)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                pipe.execute()
            except WatchError:
                return self._start_once(job)   # the API or the reaper touched it: look again
        running = Running(job, queue, execution, params, q.job_images(job), token)
        with self._lock:
            self.executions[execution.id] = execution
            self._inflight[job.id] = running
        return running

    # ------------------------------------------------------------ ending jobs (any thread)
    # Each ends a started job once: the first call wins, later ones for the same job do nothing.
    # The outcome is recorded only after this worker's owner token is claimed in Redis.

    def finish_succeeded(self, running: Running, result: dict) -> bool:
        def record() -> None:
            # progress stays: the job view shows it only while running, and clearing it before the
            # status turns succeeded let a poll in between see a running job without progress
            running.job.meta.update(model_s=result.get("model_s"))
            running.job.save_meta()
            self._finalize_success(running.job, running.queue, running.execution, result)
        return self._end(running, "succeeded", record)

    def finish_failed(self, running: Running, code: str, message: str, exc_info=None) -> bool:
        exc_info = exc_info or (JobFailed, JobFailed(f"{code}: {message}"), None)

        def record() -> None:
            running.job.meta.update(error={"code": code, "message": message}, progress=None)
            running.job.save_meta()
            self._finalize_failure(running.job, running.queue, running.execution, exc_info)
        return self._end(running, "failed", record)

    def finish_canceled(self, running: Running) -> bool:
        """A running job canceled at a scale boundary: end its execution and mark it canceled."""
        job = running.job

        def record() -> None:
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
        return self._end(running, "canceled", record)

    def _end(self, running: Running, status: str, record: Callable[[], None]) -> bool:
        job = running.job
        with self._lock:
            if running.ending or job.id not in self._inflight:
                return False
            running.ending = True
        try:
            owned = retry_redis(lambda: recovery.claim(self.connection, job, running.token), f"job {job.id}: claim")
            if owned:
                retry_redis(lambda: self._locked(record), f"job {job.id}: record {status}")
        finally:
            with self._lock:
                self._inflight.pop(job.id, None)
        if not owned:
            log.warning("job %s was re-queued away from this worker; its %s outcome here is dropped", job.id, status)
            return False
        if status == "canceled":
            log.info("job %s canceled while running", job.id)
        self._after(job, status)
        return True

    def _locked(self, action: Callable[[], None]) -> None:
        with self._lock:
            action()

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
        ended, enqueued, started = job.ended_at, job.enqueued_at, job.started_at
        latency = (ended - enqueued).total_seconds() if ended and enqueued else None
        wait = (started - enqueued).total_seconds() if started and enqueued and status != "expired" else None
        with self.connection.pipeline(transaction=False) as pipe:   # one round trip
            q.clear_cancel_flag(pipe, job.id)
            q.job_ended(pipe, job)
            q.record_finished(pipe, self.model, status, latency, wait)
            pipe.execute()
        self.runner.metrics.jobs.labels(status).inc()

    # ------------------------------------------------------------ giving jobs back

    def _release(self, runnings: list[Running], *, count: bool, reason: str) -> None:
        """Put started jobs that will not finish here back at the front of their queue (or fail
        them as `worker_lost` past STAR_MAX_REQUEUES when `count`)."""
        for running in runnings:
            with self._lock:
                if running.ending or running.job.id not in self._inflight:
                    continue
                running.ending = True
            try:
                action = retry_redis(lambda: recovery.release(
                    self.connection, running.job, running.token, [running.execution], count=count,
                    max_requeues=self.max_requeues, reason=reason), f"job {running.job.id}: release", give_up_s=30)
            except REDIS_DOWN:
                action = None   # the reaper re-queues it once this worker's heartbeat is gone
            with self._lock:
                self._inflight.pop(running.job.id, None)
                self.executions.pop(running.execution.id, None)
            log.warning("job %s: %s (%s)", running.job.id, action or "left for the reaper", reason)
            if action:
                self.runner.metrics.requeues.labels(reason.replace(" ", "_")).inc()

    def _fail_worker(self, exc: DeviceFailure) -> None:
        """A device error that leaves the device unusable: give the batch back, report `failed`
        and stop, so the supervisor starts a fresh process."""
        log.critical("device error; this worker cannot go on: %s", exc)
        self.fatal = exc
        self.health.set_state("failed")
        self._release([r for r in self._batch if r.stage == "model"], count=True, reason="device error")
        self._stop_requested = True
