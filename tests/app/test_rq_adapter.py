"""What the job protocol relies on in RQ (app/jobs/rq_adapter.py), checked against the pinned RQ
and a real Redis: an RQ upgrade that changes one of these fails here, naming what changed."""
from __future__ import annotations

import inspect
import tomllib
import uuid
from pathlib import Path

import pytest
import rq
from rq import Queue
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.worker import BaseWorker

from app.jobs import keys, submit
from app.jobs.rq_adapter import (SERIALIZER, get_queue, give_back, intermediate_has, persist_record,
                                  stored_status)

ROOT = Path(__file__).resolve().parents[2]

# Every RQ call the job protocol and the worker make, with the parameters they pass.
CALLS = {
    "Queue.enqueue_call": (Queue.enqueue_call, {"func", "kwargs", "meta", "result_ttl", "failure_ttl", "job_id",
                                                "timeout", "ttl", "pipeline", "description"}),
    "Queue.enqueue_job": (Queue.enqueue_job, {"job", "pipeline", "at_front"}),
    "Queue.push_job_id": (Queue.push_job_id, {"job_id", "pipeline", "at_front"}),
    "Queue.dequeue_any": (Queue.dequeue_any, {"queues", "timeout", "connection", "job_class", "serializer"}),
    "Queue.get_job_position": (Queue.get_job_position, {"job_or_id"}),
    "Job.fetch_many": (Job.fetch_many, {"job_ids", "connection", "serializer"}),
    "Job.get_status": (Job.get_status, {"refresh"}),
    "Job.set_status": (Job.set_status, {"status", "pipeline"}),
    "Job.save": (Job.save, {"pipeline", "include_meta"}),
    "Job.cancel": (Job.cancel, {"pipeline"}),
    "Job.cleanup": (Job.cleanup, {"ttl", "pipeline", "remove_from_queue"}),
    "Job.heartbeat": (Job.heartbeat, {"timestamp", "ttl", "pipeline"}),
    "Job.prepare_for_execution": (Job.prepare_for_execution, {"worker_name", "pipeline"}),
    "Job.get_result_ttl": (Job.get_result_ttl, {"default_ttl"}),
    "Execution.create": (Execution.create, {"job", "ttl", "pipeline", "worker_name"}),
    "Execution.delete": (Execution.delete, {"job", "pipeline"}),
    "Result.create": (Result.create, {"job", "type", "ttl", "return_value", "worker_name", "pipeline",
                                      "execution_id", "execution_started_at", "execution_ended_at"}),
    "Result.create_failure": (Result.create_failure, {"job", "ttl", "exc_string", "worker_name", "pipeline"}),
    "FinishedJobRegistry.add": (FinishedJobRegistry.add, {"job", "ttl", "pipeline"}),
    "FailedJobRegistry.add": (FailedJobRegistry.add, {"job", "ttl", "exc_string", "pipeline"}),
    "StartedJobRegistry.get_job_and_execution_ids": (StartedJobRegistry.get_job_and_execution_ids, {"cleanup"}),
    "record_job_failure": (record_job_failure, {"job", "exc_string", "pipeline"}),
    "BaseWorker.cleanup_execution": (BaseWorker.cleanup_execution, {"job", "pipeline", "execution"}),
    "BaseWorker.heartbeat": (BaseWorker.heartbeat, {"timeout", "pipeline"}),
    "BaseWorker.maintain_heartbeats": (BaseWorker.maintain_heartbeats, {"job", "execution"}),
    "BaseWorker.increment_successful_job_count": (BaseWorker.increment_successful_job_count, {"pipeline"}),
    "BaseWorker.increment_failed_job_count": (BaseWorker.increment_failed_job_count, {"pipeline"}),
    "BaseWorker.increment_total_working_time": (BaseWorker.increment_total_working_time,
                                                {"job_execution_time", "pipeline"}),
    "BaseWorker.get_heartbeat_ttl": (BaseWorker.get_heartbeat_ttl, {"job", "working_time"}),
    "BaseWorker.execute_job": (BaseWorker.execute_job, {"job", "queue"}),
    "BaseWorker.request_stop": (BaseWorker.request_stop, {"signum", "frame"}),
}


def test_rq_is_the_pinned_version():
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["api"]
    assert f"rq=={rq.__version__}" in pins, f"RQ {rq.__version__} is installed; the api extra pins {pins}"


@pytest.mark.parametrize("name", sorted(CALLS))
def test_every_rq_call_we_make_takes_the_parameters_we_pass(name):
    function, used = CALLS[name]
    parameters = set(inspect.signature(function).parameters)
    missing = used - parameters
    assert not missing, f"RQ's {name} no longer takes {sorted(missing)}: update app/jobs (and this list)"


def test_rqs_work_loop_dequeues_through_the_workers_queue_class():
    """BatchWorker takes its lanes in order by giving RQ queue_class=app.jobs.lanes.LaneQueue, whose
    dequeue_any moves the id to the lane's intermediate list (RQ's own multi-queue dequeue pops
    without it): RQ's loop must still dequeue through queue_class.dequeue_any, called as below."""
    from app.jobs.lanes import LaneQueue

    source = inspect.getsource(BaseWorker.dequeue_job_and_maintain_ttl)
    assert "self.queue_class.dequeue_any(" in source, "RQ's work loop no longer uses queue_class.dequeue_any"
    assert set(inspect.signature(LaneQueue.dequeue_any).parameters) == set(
        inspect.signature(Queue.dequeue_any).parameters), "RQ's dequeue_any changed its parameters"


def test_rq_ends_its_work_loop_on_stop_requested():
    """worker.rq_worker raises StopRequested from execute_job after a device error."""
    source = inspect.getsource(BaseWorker.work)
    assert "except StopRequested" in source, "RQ's work() no longer ends on StopRequested (worker.rq_worker)"


@pytest.fixture
def queued(conn):
    params = {"prompt": "x", "negative_prompt": "", "n": 1, "seed": 0, "size": 64}
    job, position = submit.enqueue(conn, params, "adapter", job_id=str(uuid.uuid4()), deadline_s=60,
                                   result_ttl=60, failure_ttl=60)
    return job, get_queue(conn, "adapter")


def test_a_queue_is_a_list_at_its_key(conn, queued):
    job, queue = queued
    assert conn.type(queue.key) == b"list" and conn.llen(queue.key) == queue.count == 1
    assert submit.enqueue(conn, dict(job.kwargs), "adapter", job_id=str(uuid.uuid4()), deadline_s=60,
                          result_ttl=60, failure_ttl=60)[1] == 1   # the position from LLEN in the push


def test_dequeue_moves_the_id_to_the_intermediate_list_and_give_back_undoes_it(conn, queued):
    job, queue = queued
    pulled, _ = Queue.dequeue_any([queue], None, connection=conn, serializer=SERIALIZER)
    assert pulled.id == job.id and queue.count == 0
    with conn.pipeline() as pipe:
        pipe.watch(queue.intermediate_queue_key)
        assert intermediate_has(pipe, queue, job.id) and queue.intermediate_queue.get_job_ids() == [job.id]
        pipe.unwatch()
    give_back(conn, queue, job.id)
    assert queue.get_job_ids() == [job.id] and queue.intermediate_queue.get_job_ids() == []


def test_the_status_is_the_status_field_of_the_job_hash(conn, queued):
    job, _ = queued
    with conn.pipeline() as pipe:
        pipe.watch(job.key)
        assert stored_status(pipe, job.key) == job.get_status().value == JobStatus.QUEUED.value
        pipe.unwatch()
    conn.delete(job.key)
    with conn.pipeline() as pipe:
        pipe.watch(job.key)
        assert stored_status(pipe, job.key) is None
        pipe.unwatch()


def test_a_started_record_does_not_expire_once_persisted(conn, queued):
    job, _ = queued
    assert conn.ttl(job.key) > 0   # a never-started job's record expires after its deadline
    with conn.pipeline() as pipe:
        persist_record(pipe, job)
        pipe.execute()
    assert conn.ttl(job.key) == -1


def test_our_fields_in_the_job_hash_survive_rqs_writes(conn, queued):
    job, queue = queued
    conn.hset(job.key, keys.OWNER_FIELD, "token")
    with conn.pipeline() as pipe:
        job.prepare_for_execution("w", pipeline=pipe)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        job.save(pipeline=pipe)
        job.failed_job_registry.add(job, ttl=60, exc_string="x", pipeline=pipe)
        job.cleanup(60, pipeline=pipe, remove_from_queue=False)
        pipe.execute()
    with conn.pipeline() as pipe:
        queue.enqueue_job(job, pipeline=pipe, at_front=True)   # starts the transaction itself
        job.save(pipeline=pipe)
        pipe.execute()
    assert conn.hget(job.key, keys.OWNER_FIELD) == b"token"
    assert Job.fetch(job.id, connection=conn, serializer=SERIALIZER).kwargs == job.kwargs
