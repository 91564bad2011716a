"""A non-forking RQ worker that runs jobs in batches; every job stays a real RQ job.

RQ's own loop (`work()`: registration, suspension, maintenance, signals) dequeues one job and
calls `execute_job`; from there one batch follows the data path:

    claim    collect more jobs of the model's lanes, highest lane first (worker.batcher,
             app.jobs.lanes), and start each (app.jobs.claim)
    run      one model call (worker.runner), progress and cancels at each scale (app.jobs.progress)
    publish  each succeeded job's PNGs encoded and stored on the encode pool (worker.publish)
    finish   each outcome recorded once, by this attempt if it still owns the job (app.jobs.finish),
             or the job given back to the queue (app.jobs.release)

The heartbeat thread (worker.health) keeps RQ's heartbeats of in-flight jobs alive, runs the
reaper and, past the drain grace after SIGTERM, gives the running batch back. Every Redis write
that is retried stops retrying when the stop gives up on Redis (worker.stopping): its job is then
left for the reaper.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job
from rq.worker import WorkerStatus

from app.jobs import claim, finish, progress, reaper, release
from app.jobs.claim import Expired, Running
from app.jobs.lanes import LaneQueue
from app.jobs.rq_adapter import SERIALIZER
from worker.batcher import Collector
from worker.health import Health
from worker.publish import BatchReport, Publisher, job_usage
from worker.resilience import REDIS_DOWN, RedisTolerant, retry_redis
from worker.runner import (BatchReleased, BatchRunner, Canceled, DeviceFailure, Failed, Outcome, Released,
                           Succeeded, Work)

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A job this worker started and has not ended yet."""

    running: Running
    stage: str = "model"     # model -> publish (its images are being stored)
    ending: bool = False     # an outcome is being recorded (or it was released)

    @property
    def job(self) -> Job:
        return self.running.job


class BatchWorker(RedisTolerant):
    def __init__(self, queue_names: list[str], *, connection, name: str, runner: BatchRunner, publisher: Publisher,
                 health: Health, sampling: dict, max_batch: int, max_wait_ms: int, result_ttl: int,
                 deadline_s: float = 30.0, max_requeues: int = 2):
        """queue_names: the model's lane queues, highest lane first (app.jobs.lanes.lane_names):
        RQ's loop and the batch collector both take them in that order."""
        super().__init__(queue_names, name=name, connection=connection, serializer=SERIALIZER,
                         default_result_ttl=result_ttl, queue_class=LaneQueue)
        self.by_name = {queue.name: queue for queue in self.queues}
        self.runner, self.publisher, self.health = runner, publisher, health
        self.metrics = runner.metrics
        self.sampling = sampling                    # the model's defaults for fields a request left out (+ sampler)
        self.deadline_s = deadline_s
        self.max_requeues = max_requeues
        self.fatal: BaseException | None = None   # a device error: the process must be replaced
        self.released = False                      # the drain grace passed: the batch was put back
        self._lock = threading.RLock()   # in-flight bookkeeping from the encode threads and the heartbeat
        self._inflight: dict[str, InFlight] = {}   # started and not yet ended (any batch)
        self._batch: list[InFlight] = []            # started in the current batch
        self.collector = Collector(images_of=claim.job_images, pull=self._pull, start=self._start,
                                   give_back=self._give_back, max_images=max_batch,
                                   max_wait_s=max_wait_ms / 1000.0)
        health.hooks += [self.beat_jobs, self.reap]
        health.grace_hooks.append(self.release_after_grace)
        health.shutdown.unfinished = lambda: sorted(self._inflight)
        self.gave_up = health.shutdown.give_up.is_set   # retried Redis writes stop when this is true

    # ------------------------------------------------------------ RQ hooks

    def execute_job(self, job: Job, queue: Queue) -> None:
        self.set_state(WorkerStatus.BUSY)   # a SIGTERM now waits for the batch (RQ's warm shutdown)
        self.health.set_state("busy")
        self._batch = []   # filled by _start, so a failure even mid-collect ends every started job
        try:
            self._run_batch(job)
        except DeviceFailure as exc:
            self._fail_worker(exc)
        except REDIS_DOWN as exc:
            log.warning("batch interrupted by a Redis outage (%s); its jobs go back to the queue", exc)
        except Exception as exc:
            log.exception("batch failed outside the model call")
            self._fail_all(self._batch, "internal_error", f"worker error ({type(exc).__name__}; details in the "
                           "worker's log)", "".join(traceback.format_exception(exc)))
        finally:
            self._release([f for f in self._batch if f.stage == "model"], count=False, reason="batch abandoned")
            self.set_state(WorkerStatus.IDLE)
            if self.fatal is None:
                self.health.set_state("ready")
        if self.fatal is not None:
            raise StopRequested()   # RQ's loop ends: the supervisor starts a fresh process

    def _run_batch(self, first: Job) -> None:
        batch = self.collector.collect(first)
        if not batch:
            return
        outcomes = self.runner.run([Work(f.job.id, f.running.params) for f in batch], self._on_scale(batch))
        report = BatchReport([f.job.id for f in batch], sum(f.running.images for f in batch),
                             [_queue_wait(f.job) for f in batch], _model_s(outcomes), pending=len(batch))
        for inflight, outcome in zip(batch, outcomes):
            self._finish(inflight, outcome, report)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        """RQ fails a started job whose execution heartbeat is older than this; the reaper acts
        well before (app.jobs.reaper.rq_execution_ttl)."""
        return reaper.rq_execution_ttl(self.deadline_s)

    def run_maintenance_tasks(self) -> None:
        """Our reaper first: RQ's own cleanup would fail abandoned jobs that we re-queue."""
        try:
            self.reap()
            if reaper.redis_uptime(self.connection) < self.deadline_s:
                return   # Redis just restarted: let live workers re-register before RQ judges them
        except REDIS_DOWN as exc:
            log.warning("maintenance skipped (Redis unavailable): %s", exc)
            return
        super().run_maintenance_tasks()

    def stopping(self) -> bool:
        return self.health.drain_requested

    def request_stop(self, signum, frame) -> None:
        self.health.shutdown.signal()
        super().request_stop(signum, frame)

    def request_force_stop(self, signum, frame) -> None:
        self.health.shutdown.signal()   # a second signal: give up on Redis now (worker.stopping)
        super().request_force_stop(signum, frame)

    def set_shutdown_requested_date(self) -> None:
        """Not written: RQ calls this from the signal handler, where a Redis that is down would fail
        (or hang) whatever the main thread was doing, the model call included."""

    def teardown(self) -> None:
        self.publisher.close()   # finish publishing and recording the last batch first
        self._release(list(self._inflight.values()), count=False, reason="worker stopped")
        if self._inflight:
            log.warning("stopping with job(s) not recorded, left for the reaper: %s", ", ".join(sorted(self._inflight)))
        super().teardown()

    # ------------------------------------------------------------ heartbeat thread

    def beat_jobs(self) -> None:
        """RQ heartbeats (worker, execution, job) for every job started and not yet finished."""
        with self._lock:
            for inflight in list(self._inflight.values()):
                self.maintain_heartbeats(inflight.job, inflight.running.execution)

    def reap(self) -> None:
        """Re-queue the jobs of dead workers (at most one reaper acts per heartbeat period)."""
        for outcome in reaper.reap(self.connection, max_requeues=self.max_requeues,
                                   deadline_s=self.deadline_s, lock_s=self.health.period_s):
            if outcome.action != "expired":   # a queued job past its deadline: not a requeue
                self.metrics.requeues.labels(f"reaper_{outcome.action}").inc()

    def release_after_grace(self) -> None:
        """The drain grace is over and the batch still runs: put its jobs back and stop it."""
        stuck = [f for f in list(self._inflight.values()) if f.stage == "model"]
        if stuck:
            log.warning("drain grace over; putting %d running job(s) back on the queue", len(stuck))
            self.released = True
            self._release(stuck, count=False, reason="drain grace over")

    # ------------------------------------------------------------ claim

    def _pull(self, timeout_s: float) -> Job | None:
        if self.health.drain_requested:
            return None   # a draining worker takes nothing more
        try:
            return claim.pull(self, self.queues, timeout_s)
        except REDIS_DOWN:
            return None

    def _queue_of(self, job: Job) -> Queue:
        return self.by_name[job.origin]   # pulled from one of this worker's lanes

    def _give_back(self, job: Job) -> None:
        retry_redis(lambda: claim.put_back(self, self._queue_of(job), job), f"job {job.id}: give back",
                    stop=self.gave_up)

    def _start(self, job: Job) -> InFlight | None:
        try:
            started = retry_redis(lambda: claim.start(self, job, self._queue_of(job), self.sampling),
                                  f"job {job.id}: start", stop=self.gave_up)
        except REDIS_DOWN:
            return None   # left in RQ's intermediate list: the reaper puts it back
        if isinstance(started, Expired):
            log.info("job %s expired (%s)", started.job_id, started.message)
            self.metrics.jobs.labels("expired").inc()
            return None
        if started is None:
            return None
        inflight = InFlight(started)
        with self._lock:
            self._inflight[job.id] = inflight
        self._batch.append(inflight)
        return inflight

    # ------------------------------------------------------------ run

    def _on_scale(self, batch: list[InFlight]) -> Callable[[int, int, list[str]], Mapping[str, str]]:
        by_id = {f.job.id: f for f in batch}

        def on_scale(k: int, scales: int, live: list[str]) -> Mapping[str, str]:
            if self.released:
                raise BatchReleased()
            try:
                canceled, lost = progress.scale_boundary(self.connection, [by_id[i].running for i in live], k, scales)
            except REDIS_DOWN as exc:   # progress is best-effort; the batch goes on
                log.warning("scale %d/%d: progress not recorded (Redis unavailable: %s)", k, scales, exc)
                return {}
            return {**{i: "canceled" for i in canceled}, **{i: "lost" for i in lost}}
        return on_scale

    # ------------------------------------------------------------ publish and finish

    def _finish(self, inflight: InFlight, outcome: Outcome, report: BatchReport) -> None:
        if isinstance(outcome, Succeeded):
            inflight.stage = "publish"
            self.publisher.submit(lambda: self._publish(inflight, outcome, report))
            return
        if isinstance(outcome, Failed):
            self._end(inflight, "failed", lambda r: finish.failed(
                self, r, outcome.code, outcome.message,
                "".join(traceback.format_exception(outcome.error)) if outcome.error else ""))
        elif isinstance(outcome, Canceled):
            if self._end(inflight, "canceled", lambda r: finish.canceled(self, r)):
                log.info("job %s canceled while running", outcome.job_id)
        elif isinstance(outcome, Released) and outcome.reason == "lost":
            self._drop(inflight, "running")
        else:
            self._release([inflight], count=False, reason="drain grace over")
        report.done()

    def _publish(self, inflight: InFlight, outcome: Succeeded, report: BatchReport) -> None:
        """On the encode pool: store the PNGs, then record success; PNGs of a job taken away from
        this worker meanwhile are deleted unpublished."""
        t0 = time.perf_counter()
        params = inflight.running.params
        try:
            images = self.publisher.store(params, [r.image for r in outcome.results])
        except Exception as exc:
            log.exception("job %s: storing its images failed", outcome.job_id)
            self._fail_all([inflight], "storage_error", f"the images could not be stored ({type(exc).__name__}; "
                           "details in the worker's log)", "".join(traceback.format_exception(exc)))   # no paths
        else:
            encode_s = time.perf_counter() - t0
            self.metrics.encode_seconds.observe(encode_s)
            result = {"images": images, "prompt_truncated": any(r.prompt_truncated for r in outcome.results),
                      "model_s": round(outcome.model_s, 4), "encode_s": round(encode_s, 4),
                      "usage": job_usage(outcome.model_s, outcome.call_images, images)}
            if not self._end(inflight, "succeeded", lambda r: finish.succeeded(self, r, result)):
                self.publisher.unpublish(images)
        report.done(time.perf_counter() - t0)

    def _fail_all(self, inflights: list[InFlight], code: str, message: str, exc_string: str) -> None:
        for inflight in inflights:     # jobs already ended are skipped
            self._end(inflight, "failed", lambda r: finish.failed(self, r, code, message, exc_string))

    def _end(self, inflight: InFlight, status: str, record: Callable[[Running], bool]) -> bool:
        """Record one outcome of a started job, once (later calls for it do nothing); False when
        it was not recorded (taken away from this worker, or Redis failed for good)."""
        job = inflight.job
        with self._lock:
            if inflight.ending or job.id not in self._inflight:
                return False
            inflight.ending = True
        try:
            owned = retry_redis(lambda: record(inflight.running), f"job {job.id}: record {status}", stop=self.gave_up)
        except Exception:
            log.exception("job %s: could not record its outcome; left for the reaper", job.id)
            return False
        finally:
            with self._lock:
                self._inflight.pop(job.id, None)
        if not owned:
            log.warning("job %s was re-queued away from this worker; its %s outcome here is dropped", job.id, status)
            return False
        self.metrics.jobs.labels(status).inc()
        return True

    def _drop(self, inflight: InFlight, status: str) -> None:
        """A job taken away from this worker mid-run: nothing of it is recorded here."""
        with self._lock:
            self._inflight.pop(inflight.job.id, None)
            self.executions.pop(inflight.running.execution.id, None)
        log.warning("job %s was re-queued away from this worker; its %s outcome here is dropped",
                    inflight.job.id, status)

    def _release(self, inflights: list[InFlight], *, count: bool, reason: str) -> None:
        """Put started jobs that will not finish here back at the front of their queue (or fail
        them as `worker_lost` past STAR_MAX_REQUEUES when `count`)."""
        for inflight in inflights:
            with self._lock:
                if inflight.ending or inflight.job.id not in self._inflight:
                    continue
                inflight.ending = True
            running = inflight.running
            try:
                action = retry_redis(lambda: release.release(
                    self.connection, running.job, running.token, [running.execution], count=count,
                    max_requeues=self.max_requeues, reason=reason), f"job {running.job.id}: release", give_up_s=30,
                    stop=self.gave_up)
            except REDIS_DOWN:
                action = None   # the reaper re-queues it once this worker's heartbeat is gone
            with self._lock:
                self._inflight.pop(running.job.id, None)
                self.executions.pop(running.execution.id, None)
            log.warning("job %s: %s (%s)", running.job.id, action or "left for the reaper", reason)
            if action:
                self.metrics.requeues.labels(reason.replace(" ", "_")).inc()

    def _fail_worker(self, exc: DeviceFailure) -> None:
        """A device error that leaves the device unusable: give the batch back and report `failed`;
        execute_job then ends RQ's loop, so the supervisor starts a fresh process."""
        log.critical("device error; this worker cannot go on: %s", exc)
        self.fatal = exc
        self.health.set_state("failed")
        self._release([f for f in self._batch if f.stage == "model"], count=True, reason="device error")


def _queue_wait(job: Job) -> float:
    if job.started_at and job.enqueued_at:
        return (job.started_at - job.enqueued_at).total_seconds()
    return 0.0


def _model_s(outcomes: list[Outcome]) -> float:
    return max((o.model_s for o in outcomes if isinstance(o, Succeeded)), default=0.0)
