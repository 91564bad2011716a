"""Priority lanes against a real Redis with the real batching worker (in-process, burst mode) and a
small recording pipeline: which jobs each model call held, in order. No timing assertions: a
job's lane shows in the batches it lands in."""
from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from app.jobs import keys, reaper, submit
from app.jobs.claim import pull
from app.jobs.lanes import LANES, lane_names, lane_queues
from app.jobs.read import all_queue_depths, lane_stats, queue_depth, read_job
from app.jobs.rq_adapter import queue_name
from model.request import ImageResult
from worker.main import run
from worker.noop import NoopPipeline
from worker.settings import WorkerSettings

MODEL = "noop-64"


class Recording(NoopPipeline):
    """Flat images; records each model call's prompts (one entry per image); `during_first(k)` runs
    at each scale of the first call only."""

    def __init__(self, during_first=None):
        super().__init__(64)
        self.batches: list[list[str]] = []
        self.during_first = during_first

    def generate(self, requests, *, on_scale=None):
        self.batches.append([r.prompt for r in requests])
        for k in range(1, len(self.patch_nums) + 1):
            if self.during_first and len(self.batches) == 1:
                self.during_first(k)
            if on_scale:
                on_scale(k, len(self.patch_nums))
        return [ImageResult(np.full((64, 64, 3), 7, np.uint8), False) for _ in requests]


@pytest.fixture
def settings(redis_url, tmp_path):
    return WorkerSettings(redis_url=redis_url, storage_dir=tmp_path / "images", max_batch=2, max_wait_ms=0,
                          metrics_port=0, heartbeat_s=0.2, warmup=False, name="w-lanes")


def enqueue(conn, prompt, priority="normal", n=1, deadline_s=60.0, limit=None):
    params = {"prompt": prompt, "negative_prompt": "", "size": 64, "n": n, "seed": 1, "guidance_scale": 4.0,
              "top_k": 600, "top_p": 0.8, "temperature": 1.0}
    accepted = submit.enqueue(conn, params, MODEL, job_id=str(uuid.uuid4()), deadline_s=deadline_s,
                              result_ttl=600, failure_ttl=600, priority=priority, queue_limit=limit)
    return accepted[0].id if accepted else None


def test_a_burst_of_low_jobs_delays_a_high_job_by_at_most_one_batch(conn, settings):
    low = [enqueue(conn, f"low{i}", "low") for i in range(8)]
    late = {}

    def submit_during_first_batch(k):
        if k == 1:   # the first batch (two low jobs) is running: a high and a normal job arrive
            late["normal"] = enqueue(conn, "normal", "normal")
            late["high"] = enqueue(conn, "high", "high")
    pipe = Recording(submit_during_first_batch)
    assert run(settings, pipeline=pipe, burst=True) == 0
    assert pipe.batches == [["low0", "low1"], ["high", "normal"], ["low2", "low3"], ["low4", "low5"],
                            ["low6", "low7"]]
    assert all(read_job(conn, job_id).status == "succeeded" for job_id in [*low, *late.values()])
    assert read_job(conn, late["high"]).params["priority"] == "high"


def test_a_batch_fills_highest_lane_first_and_lower_lanes_take_the_room_left(conn, settings):
    settings = settings.model_copy(update={"max_batch": 4})
    for prompt, lane in [("low0", "low"), ("low1", "low"), ("normal0", "normal"), ("high0", "high"),
                         ("low2", "low"), ("high1", "high")]:
        enqueue(conn, prompt, lane)
    pipe = Recording()
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["high0", "high1", "normal0", "low0"], ["low1", "low2"]]


def test_a_job_that_does_not_fit_goes_back_to_the_front_of_its_own_lane(conn, settings):
    enqueue(conn, "high", "high")
    two = enqueue(conn, "two", "low", n=2)
    enqueue(conn, "low", "low")
    pipe = Recording()
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["high"], ["two", "two"], ["low"]]
    assert read_job(conn, two).status == "succeeded"


def test_a_low_job_still_expires_at_its_deadline_behind_higher_lanes(conn, settings):
    late = enqueue(conn, "late", "low", deadline_s=0.05)
    time.sleep(0.1)
    for i in range(3):
        enqueue(conn, f"high{i}", "high")
    pipe = Recording()
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["high0", "high1"], ["high2"]]
    view = read_job(conn, late)
    assert view.status == "expired" and view.started_at is None and view.params["priority"] == "low"


def test_the_reaper_expires_an_overdue_job_of_a_lower_lane_that_no_worker_pulls(conn):
    late = enqueue(conn, "late", "low", deadline_s=0.05)
    time.sleep(0.1)
    outcomes = reaper.reap(conn, max_requeues=2, deadline_s=0.0, lock_s=1.0)
    assert [(o.job_id, o.action) for o in outcomes] == [(late, "expired")]
    assert read_job(conn, late).status == "expired" and queue_depth(conn, MODEL) == 0


def test_the_queue_limit_counts_every_lane_of_the_model(conn):
    assert enqueue(conn, "a", "low", limit=2) and enqueue(conn, "b", "high", limit=2)
    assert enqueue(conn, "c", "normal", limit=2) is None and enqueue(conn, "d", "high", limit=2) is None
    assert queue_depth(conn, MODEL) == 2


def test_queue_positions_count_the_higher_lanes_and_lanes_report_depth_and_wait(conn):
    lows = [enqueue(conn, f"low{i}", "low") for i in range(2)]
    normal = enqueue(conn, "normal", "normal")
    high = enqueue(conn, "high", "high")
    assert [read_job(conn, job_id).queue_position for job_id in (high, normal, *lows)] == [0, 1, 2, 3]
    stats = lane_stats(conn, MODEL)
    assert list(stats) == list(LANES) and {lane: s.depth for lane, s in stats.items()} == {
        "high": 1, "normal": 1, "low": 2}
    assert stats["low"].oldest_wait_s >= stats["high"].oldest_wait_s >= 0
    assert all_queue_depths(conn) == {(MODEL, "high"): 1, (MODEL, "normal"): 1, (MODEL, "low"): 2}
    assert lane_names(queue_name(MODEL)) == [f"star-{MODEL}@high", f"star-{MODEL}", f"star-{MODEL}@low"]


class _Puller:
    connection = None
    job_class = None


def test_a_worker_waiting_on_empty_lanes_is_woken_by_a_job_in_any_lane(conn, monkeypatch):
    monkeypatch.setattr(keys, "WAKE_BLOCK_S", 120.0)   # only the wake token can end the wait early
    puller = _Puller()
    puller.connection = conn
    got = []
    waiting = threading.Thread(target=lambda: got.append(pull(puller, lane_queues(conn, MODEL), 120.0)))
    waiting.start()
    time.sleep(0.2)   # let it block (if it has not yet, it finds the job at once: the same outcome)
    job_id = enqueue(conn, "wake", "low")
    waiting.join(60)
    assert not waiting.is_alive(), "a job in the low lane did not wake the waiting pull"
    assert [job.id for job in got] == [job_id]
    assert conn.lrange(lane_queues(conn, MODEL)[2].intermediate_queue_key, 0, -1) == [job_id.encode()]
    assert pull(puller, lane_queues(conn, MODEL), 0) is None and not conn.exists(keys.WAKE_KEY.format(
        queue_name(MODEL)))   # all lanes empty: the stale tokens are gone
