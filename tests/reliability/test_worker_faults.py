"""Workers that die, stall, drain or hit device errors mid-batch lose no accepted job and never
publish a job's images twice. Real Redis, the API under uvicorn, worker subprocesses
(tests/reliability/faulty_worker.py: the real worker with the noop pipeline and injected faults)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from rq import Queue
from rq.job import Job

from app.jobs.rq_adapter import SERIALIZER, connect, queue_name
from app.redis_server import free_port


def job_meta(redis_url: str, job_id: str) -> dict:
    return Job.fetch(job_id, connection=connect(redis_url), serializer=SERIALIZER).meta


def held(tmp_path) -> Path:
    """A TEST_HOLD_FILE (faulty_worker.py) that exists: a worker given it stops after each scale of
    a batch until the file goes, so a test kills, stops or drains it mid-batch on any machine."""
    hold = tmp_path / "hold"
    hold.touch()
    return hold


def registries_are_clean(redis_url: str, model: str = "noop-64") -> None:
    queue = Queue(queue_name(model), connection=connect(redis_url))
    assert queue.started_job_registry.get_job_ids(cleanup=False) == []
    assert queue.failed_job_registry.get_job_ids(cleanup=False) == []


def test_a_worker_killed_mid_batch_loses_no_job(env_stack, h, redis_url, tmp_path):
    api, start_worker = env_stack(job_deadline_s=2.5)   # re-queued past it: the deadline starts afresh
    hold = held(tmp_path)                                # the batch waits after its first scale
    doomed = start_worker("doomed", TEST_HOLD_FILE=str(hold), STAR_MAX_WAIT_MS="30000")   # a full batch starts at once
    sizes = (1, 2, 1)
    ids = [h.post(api.client, f"a harbour, take {i}", n=n, seed=10 * i) for i, n in enumerate(sizes)]
    h.wait_job(api.client, ids[0], h.running_at(1))
    assert [h.view(api.client, i)["status"] for i in ids] == ["running"] * 3   # one batch of 4 images

    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    start_worker("rescuer")   # its reaper re-queues the batch once the dead worker's entry expires
    for job_id, n in zip(ids, sizes):
        view = h.wait_job(api.client, job_id, timeout=30)
        assert view["status"] == "succeeded" and len(view["images"]) == n, view
        job = Job.fetch(job_id, connection=connect(redis_url), serializer=SERIALIZER)
        assert job.meta["requeues"] == 1
        assert job.meta["deadline_at"] > job.enqueued_at.timestamp() + 2.5   # extended when re-queued
    assert len(h.stored_pngs(tmp_path / "images")) == sum(sizes)   # exactly one set per job
    registries_are_clean(redis_url)


@pytest.mark.parametrize("reaper_s", [0.3, 0.0])
def test_the_api_requeues_the_jobs_of_a_dead_worker_when_no_worker_is_left(env_stack, h, redis_url, reaper_s,
                                                                         tmp_path):
    """With no live worker to reap, the API's reaper (STAR_REAPER_S) puts the job back on the queue;
    without it (0) the job would read `running` until a worker starts."""
    api, start_worker = env_stack(reaper_s=reaper_s, worker_deadline_s=1.5)
    doomed = start_worker("doomed", TEST_HOLD_FILE=str(held(tmp_path)))
    job_id = h.post(api.client, "an orphaned request")
    h.wait_job(api.client, job_id, h.running_at(1))
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    if reaper_s == 0:
        time.sleep(3.0)   # twice the worker deadline
        assert h.view(api.client, job_id)["status"] == "running"
        return
    h.wait_job(api.client, job_id, lambda v: v["status"] == "queued", timeout=20)
    assert Job.fetch(job_id, connection=connect(redis_url), serializer=SERIALIZER).meta["requeues"] == 1
    start_worker("late")
    done = h.wait_job(api.client, job_id, timeout=30)
    assert done["status"] == "succeeded" and len(done["images"]) == 1, done


def test_a_worker_presumed_dead_that_comes_back_publishes_nothing(env_stack, h, redis_url, tmp_path):
    api, start_worker = env_stack()
    hold = held(tmp_path)
    stalled = start_worker("stalled", TEST_HOLD_FILE=str(hold))
    job_id = h.post(api.client, "a quiet pond", n=2)
    h.wait_job(api.client, job_id, h.running_at(1))
    os.kill(stalled.process.pid, signal.SIGSTOP)    # alive, but silent past its deadline
    try:
        start_worker("rescuer")
        done = h.wait_job(api.client, job_id, timeout=30)
        assert done["status"] == "succeeded" and len(done["images"]) == 2
    finally:
        hold.unlink()
        os.kill(stalled.process.pid, signal.SIGCONT)
    # Back from the dead, its next scale boundary finds the job owned by another attempt.
    h.wait_job(api.client, job_id, lambda v: "re-queued away from this worker" in stalled.tail(), timeout=20)
    assert h.view(api.client, job_id)["images"] == done["images"]
    assert len(h.stored_pngs(tmp_path / "images")) == 2
    h.wait_job(api.client, job_id, lambda v: stalled.state() in ("ready", "busy"), timeout=10)   # serving on


def test_a_job_whose_workers_keep_dying_fails_as_worker_lost(env_stack, h, redis_url, tmp_path):
    api, start_worker = env_stack()
    doomed = start_worker("doomed", TEST_HOLD_FILE=str(held(tmp_path)))
    job_id = h.post(api.client, "a cursed request")
    h.wait_job(api.client, job_id, h.running_at(1))
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(10)
    start_worker("reaper", STAR_MAX_REQUEUES="0")
    view = h.wait_job(api.client, job_id, timeout=30)
    assert view["status"] == "failed" and view["error"]["code"] == "worker_lost", view
    assert "lost" in view["error"]["message"] and view["images"] is None


def test_sigterm_past_the_grace_period_puts_the_batch_back_and_exits_0(env_stack, h, redis_url):
    api, start_worker = env_stack()
    port = free_port()
    # 1 s per scale: the batch outlasts the grace on any machine (a held batch would never reach the
    # scale boundary where the worker stops it)
    draining = start_worker("draining", TEST_SCALE_DELAY_MS="1000", STAR_DRAIN_GRACE_S="1", STAR_MAX_BATCH="2",
                            STAR_METRICS_PORT=str(port))
    running = h.post(api.client, "a long night", n=2)
    h.wait_job(api.client, running, h.running_at(1))
    behind = h.post(api.client, "waiting its turn")
    draining.process.send_signal(signal.SIGTERM)
    h.wait_job(api.client, running, lambda v: draining.state() == "draining", timeout=30)
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert 'star_worker_state{star_worker_state="draining"} 1.0' in metrics
    assert draining.process.wait(60) == 0
    assert "drain grace over" in draining.tail()
    assert h.view(api.client, running)["status"] == "queued"    # back at the front of the queue
    assert h.view(api.client, behind)["queue_position"] == 1    # never taken by the draining worker
    start_worker("next")
    assert len(h.wait_job(api.client, running, timeout=30)["images"]) == 2
    assert h.wait_job(api.client, behind, timeout=30)["status"] == "succeeded"
    assert job_meta(redis_url, running).get("requeues", 0) == 0   # a drain is not a failure


def test_out_of_memory_splits_the_batch_and_fails_only_the_image_that_never_fits(env_stack, h):
    api, start_worker = env_stack()
    worker = start_worker("small-gpu", TEST_OOM_ABOVE="2", TEST_OOM_PROMPT="huge", STAR_MAX_WAIT_MS="1500")
    pair, huge, single = (h.post(api.client, p, n=n) for p, n in (("a pair", 2), ("a huge one", 1), ("one", 1)))
    for job_id, n in ((pair, 2), (single, 1)):
        view = h.wait_job(api.client, job_id, timeout=30)
        assert view["status"] == "succeeded" and len(view["images"]) == n, view
    failed = h.wait_job(api.client, huge, timeout=30)
    assert failed["status"] == "failed" and failed["error"]["code"] == "out_of_memory"
    assert "does not fit" in failed["error"]["message"] and "64x64" in failed["error"]["message"]
    log = worker.tail(200)
    assert "out of device memory with 4 images in one call; retrying as 2 + 2" in log, log
    assert worker.state() == "ready" and worker.process.poll() is None


def test_a_device_error_requeues_the_batch_and_the_worker_exits_for_a_restart(env_stack, h, redis_url):
    api, start_worker = env_stack()
    broken = start_worker("broken", TEST_DEVICE_ERROR="1")
    job_id = h.post(api.client, "a red fox", n=2)
    assert broken.process.wait(30) == 3
    assert "device error; this worker cannot go on" in broken.tail() and "-> failed" in broken.tail()
    assert h.view(api.client, job_id)["status"] == "queued"
    start_worker("fresh")
    view = h.wait_job(api.client, job_id, timeout=30)
    assert view["status"] == "succeeded" and len(view["images"]) == 2
    assert job_meta(redis_url, job_id)["requeues"] == 1
    registries_are_clean(redis_url)
