"""The batching RQ worker in-process (burst mode) against a real Redis, with small fake pipelines
for failure injection. The end-to-end path with the real `tiny` model is in tests/integration."""
from __future__ import annotations

import io
import time
import uuid

import numpy as np
import pytest
from PIL import Image
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.worker import SimpleWorker

from app.jobs import submit
from app.jobs.cancel import request_cancel
from app.jobs.keys import CANCEL_KEY, WORKERS_SET
from app.jobs.read import read_job
from app.jobs.rq_adapter import SERIALIZER, queue_name
from app.jobs.workers import live_workers
from app.storage import LocalStorage
from model.request import ImageResult
from worker.main import run
from worker.noop import NoopPipeline
from worker.settings import WorkerSettings


class SeedPipeline(NoopPipeline):
    """Each image is flat grey at seed % 251, so every image shows which request made it; records
    each call's prompts; `hook(k, requests)` runs at every scale; prompt 'boom' raises."""

    def __init__(self, hook=None, scale_s=0.0):
        super().__init__(64, scale_s)
        self.batches: list[list[str]] = []
        self.hook = hook

    def generate(self, requests, *, on_scale=None):
        self.batches.append([r.prompt for r in requests])
        if any(r.prompt == "boom" for r in requests):
            raise ValueError("the model cannot draw a boom")
        canceled = set()
        for k in range(1, len(self.patch_nums) + 1):
            time.sleep(self.scale_s)
            if self.hook:
                self.hook(k, requests)
            canceled |= set(on_scale(k, len(self.patch_nums)) or ()) if on_scale else set()
        return [ImageResult(None, False, True) if i in canceled
                else ImageResult(np.full((64, 64, 3), r.seed % 251, np.uint8), len(r.prompt) > 77)
                for i, r in enumerate(requests)]


def params(prompt="a fox", n=1, seed=100, **extra):
    return {"prompt": prompt, "negative_prompt": "", "size": 64, "n": n, "seed": seed, "guidance_scale": 4.0,
            "top_k": 600, "top_p": 0.8, "temperature": 1.0, **extra}


@pytest.fixture
def settings(redis_url, tmp_path):
    return WorkerSettings(redis_url=redis_url, storage_dir=tmp_path / "images", max_batch=4, max_wait_ms=0,
                          metrics_port=0, heartbeat_s=0.2, warmup=False, name="w-test")


def enqueue(conn, p, deadline_s=60.0):
    job, _ = submit.enqueue(conn, p, "noop-64", job_id=str(uuid.uuid4()), deadline_s=deadline_s, result_ttl=600,
                            failure_ttl=600)
    return job.id


def state(conn, job_id):
    return read_job(conn, job_id)


def test_compatible_jobs_run_as_batches_with_per_request_results(conn, settings):
    pipe = SeedPipeline()
    ids = [enqueue(conn, params(f"p{i}", n, seed=10 * i)) for i, n in enumerate([1, 2, 1, 3, 1])]
    assert run(settings, pipeline=pipe, burst=True) == 0
    # max 4 images a call: [1+2+1], then the 3 given back to the front, then [3+1]
    assert pipe.batches == [["p0", "p1", "p1", "p2"], ["p3", "p3", "p3", "p4"]]
    storage = LocalStorage(settings.storage_dir, settings.public_base_url)
    for i, job_id in enumerate(ids):
        view = state(conn, job_id)
        assert view.status == "succeeded", view
        assert [img["seed"] for img in view.images] == [10 * i + k for k in range(len(view.images))]
        for img in view.images:
            png = Image.open(io.BytesIO(storage.get(img["id"])))
            assert png.text["seed"] == str(img["seed"]) and png.text["prompt"] == f"p{i}"
            assert (np.asarray(png) == img["seed"] % 251).all()
    finished = FinishedJobRegistry(queue_name("noop-64"), connection=conn)
    assert sorted(finished.get_job_ids()) == sorted(ids)
    assert conn.smembers(WORKERS_SET) == set()   # the worker left the registry on exit


def test_a_failing_request_does_not_fail_its_batch_mates(conn, settings):
    pipe = SeedPipeline()
    ok1, boom, ok2 = (enqueue(conn, params(p)) for p in ("ok1", "boom", "ok2"))
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches[0] == ["ok1", "boom", "ok2"] and len(pipe.batches) == 4   # batch, then each alone
    assert state(conn, ok1).status == state(conn, ok2).status == "succeeded"
    failed = state(conn, boom)
    assert failed.status == "failed" and failed.error["code"] == "model_error"
    assert "cannot draw a boom" in failed.error["message"]
    assert FailedJobRegistry(queue_name("noop-64"), connection=conn).get_job_ids() == [boom]


def test_a_job_dequeued_past_its_deadline_expires_without_running(conn, settings):
    pipe = SeedPipeline()
    late = enqueue(conn, params("late"), deadline_s=0.05)
    time.sleep(0.1)
    fresh = enqueue(conn, params("fresh"))
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["fresh"]] and state(conn, fresh).status == "succeeded"
    view = state(conn, late)
    assert view.status == "expired" and view.error["code"] == "expired" and view.started_at is None
    assert FailedJobRegistry(queue_name("noop-64"), connection=conn).get_job_ids() == [late]


def test_cancel_while_running_stops_only_that_job(conn, settings):
    ids = {}

    def cancel_b_at_scale_2(k, requests):
        if k == 2:
            assert request_cancel(conn, ids["b"]) == "cancel_requested"

    pipe = SeedPipeline(cancel_b_at_scale_2)
    ids = {name: enqueue(conn, params(name, seed=7 * i)) for i, name in enumerate("abc")}
    run(settings, pipeline=pipe, burst=True)
    assert state(conn, ids["b"]).status == "canceled"
    job_b = Job.fetch(ids["b"], connection=conn, serializer=SERIALIZER)
    assert job_b.get_status() == JobStatus.CANCELED and job_b.ended_at is not None
    assert ids["b"] in CanceledJobRegistry(queue_name("noop-64"), connection=conn).get_job_ids()
    for name in "ac":
        view = state(conn, ids[name])
        assert view.status == "succeeded" and view.images[0]["seed"] == 7 * "abc".index(name)
    assert not conn.exists(CANCEL_KEY.format(ids["b"]))


def test_a_job_canceled_while_queued_never_runs(conn, settings):
    pipe = SeedPipeline()
    gone, kept = enqueue(conn, params("gone")), enqueue(conn, params("kept"))
    assert request_cancel(conn, gone) == "canceled"
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["kept"]] and state(conn, kept).status == "succeeded"
    assert state(conn, gone).status == "canceled"


@pytest.mark.parametrize("change", ["canceled", "record gone"])
def test_a_job_changed_between_dequeue_and_start_is_dropped_and_its_batch_mates_run(conn, settings, monkeypatch, change):
    """Injected race: the job's record changes after the worker took it off the queue, just before
    it is marked started. It must not run, and the rest of the batch must."""
    from app.jobs import claim

    pipe = SeedPipeline()
    ids = {name: enqueue(conn, params(name)) for name in ("first", "victim", "last")}
    start = claim.start

    def racing(worker, job, queue, defaults):
        if job.id == ids["victim"]:
            if change == "canceled":
                conn.hset(job.key, "status", JobStatus.CANCELED.value)
            else:
                conn.delete(job.key)
        return start(worker, job, queue, defaults)

    monkeypatch.setattr(claim, "start", racing)
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["first", "last"]]
    assert not conn.lrange(Queue(queue_name("noop-64"), connection=conn).intermediate_queue_key, 0, -1)
    for name in ("first", "last"):
        assert state(conn, ids[name]).status == "succeeded"


def test_heartbeats_and_state_stay_alive_during_a_long_batch(conn, settings):
    seen = []

    def observe(k, requests):
        job = Job.fetch(job_id, connection=conn, serializer=SERIALIZER)
        worker = next(e for e in live_workers(conn) if e.name == "w-test")
        seen.append((job.last_heartbeat, worker.state, worker.heartbeat_at,
                     job_id in Queue(queue_name("noop-64"), connection=conn).started_job_registry))

    pipe = SeedPipeline(observe, scale_s=0.15)   # 10 scales: 1.5 s, heartbeat period 0.2 s
    job_id = enqueue(conn, params("slow"))
    run(settings, pipeline=pipe, burst=True)
    first, last = seen[0], seen[-1]
    assert last[0] > first[0]                    # RQ job heartbeat refreshed mid-batch
    assert last[2] > first[2]                    # worker registry heartbeat refreshed mid-batch
    assert all(s[1] == "busy" and s[3] for s in seen)
    assert state(conn, job_id).status == "succeeded"


def test_rq_sees_the_worker_and_its_counts(conn, settings):
    seen = []
    pipe = SeedPipeline(lambda k, r: k == 1 and not seen and seen.extend(SimpleWorker.all(connection=conn)))
    for i in range(3):
        enqueue(conn, params(f"p{i}"))
    enqueue(conn, params("boom"))
    run(settings, pipeline=pipe, burst=True)
    assert [w.name for w in seen] == ["w-test"] and seen[0].get_state() == "busy"
    assert seen[0].queue_names() == ["star-noop-64@high", "star-noop-64", "star-noop-64@low"]   # lanes, in order
    info = conn.hgetall("rq:worker:w-test")
    assert int(info[b"successful_job_count"]) == 3 and int(info[b"failed_job_count"]) == 1


class BrokenPipeline(SeedPipeline):
    """Returns one result too few: a bug outside any single request."""

    def generate(self, requests, *, on_scale=None):
        return super().generate(requests, on_scale=on_scale)[:-1]


def test_a_worker_bug_fails_the_started_jobs_and_the_worker_goes_on(conn, settings):
    pipe = BrokenPipeline()
    first = [enqueue(conn, params(f"p{i}")) for i in range(4)]   # one full batch
    last = enqueue(conn, params("last", n=2))
    assert run(settings, pipeline=pipe, burst=True) == 0
    assert len(pipe.batches) == 2
    for job_id in first + [last]:
        view = state(conn, job_id)
        assert view.status == "failed" and view.error["code"] == "internal_error", view
    assert Queue(queue_name("noop-64"), connection=conn).started_job_registry.count == 0


def test_a_model_that_does_not_load_exits_1_and_leaves_no_worker_behind(conn, settings):
    bad = settings.model_copy(update={"model": "noop:not-a-size"})
    assert run(bad) == 1
    assert live_workers(conn) == []


def test_run_restores_the_signal_handlers(conn, settings):
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    run(settings, pipeline=SeedPipeline(), burst=True)
    run(settings.model_copy(update={"model": "noop:bad"}))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


class SamplingPipeline(SeedPipeline):
    """Records every request; `sampling` is what its model directory recommends (config.json)."""

    def __init__(self, sampling=None):
        super().__init__()
        self.sampling = sampling or {}
        self.requests = []

    def generate(self, requests, *, on_scale=None):
        self.requests += list(requests)
        return super().generate(requests, on_scale=on_scale)


def sampling_of(request) -> tuple:
    return request.cfg, request.top_k, request.top_p, request.temperature


def test_fields_left_out_get_the_models_defaults_and_explicit_ones_win(conn, settings):
    pipe = SamplingPipeline({"cfg": 2.5, "top_k": 7, "top_p": 0.5})   # no temperature: the global one
    bare = {"prompt": "bare", "negative_prompt": "", "size": 64, "n": 2, "seed": 3}
    left_out = enqueue(conn, bare)
    nulls = enqueue(conn, {**bare, "prompt": "nulls", "guidance_scale": None, "top_k": None, "top_p": None,
                           "temperature": None})
    explicit = enqueue(conn, {**bare, "prompt": "explicit", "guidance_scale": 6.0, "top_k": 0, "top_p": None,
                              "temperature": 0.7})
    assert state(conn, left_out).params.get("guidance_scale") is None   # not known while queued
    assert run(settings, pipeline=pipe, burst=True) == 0
    used = {r.prompt: sampling_of(r) for r in pipe.requests if r.prompt != "warm-up"}
    assert used == {"bare": (2.5, 7, 0.5, 1.0), "nulls": (2.5, 7, 0.5, 1.0), "explicit": (6.0, 0, 0.5, 0.7)}
    storage = LocalStorage(settings.storage_dir, settings.public_base_url)
    for job_id, expected in ((left_out, (2.5, 7, 0.5, 1.0)), (nulls, (2.5, 7, 0.5, 1.0)),
                             (explicit, (6.0, 0, 0.5, 0.7))):
        view = state(conn, job_id)
        assert view.status == "succeeded", view
        run_with = tuple(view.params[k] for k in ("guidance_scale", "top_k", "top_p", "temperature"))
        assert run_with == expected                                       # what GET /jobs/{id} shows
        png = Image.open(io.BytesIO(storage.get(view.images[0]["id"])))
        assert (float(png.text["guidance_scale"]), int(png.text["top_k"])) == expected[:2]   # and the PNG


def test_a_model_without_sampling_defaults_gets_the_global_ones(conn, settings):
    from app.schemas import DEFAULT_SAMPLING

    pipe = SamplingPipeline()
    job_id = enqueue(conn, {"prompt": "plain", "negative_prompt": "", "size": 64, "n": 1, "seed": 3})
    run(settings, pipeline=pipe, burst=True)
    (request,) = pipe.requests
    assert sampling_of(request) == tuple(DEFAULT_SAMPLING.values()) == (4.0, 600, 0.8, 1.0)
    assert {k: state(conn, job_id).params[k] for k in DEFAULT_SAMPLING} == DEFAULT_SAMPLING


def test_the_worker_advertises_its_models_sampling_defaults_and_sampler_head(conn, settings):
    seen = []
    pipe = SamplingPipeline({"cfg": 3})
    pipe.hook = lambda k, requests: seen.extend((e.sampling, e.sampler_head) for e in live_workers(conn))
    enqueue(conn, params("x"))
    run(settings, pipeline=pipe, burst=True)
    assert seen and seen[0] == ({"guidance_scale": 3.0, "top_k": 600, "top_p": 0.8, "temperature": 1.0}, False)


def test_a_model_whose_sampling_defaults_are_out_of_range_does_not_start(conn, settings, caplog):
    assert run(settings, pipeline=SamplingPipeline({"top_p": 2.0}), burst=True) == 1
    assert "top_p=2.0 is invalid" in caplog.text and "a number from 0.0 to 1.0" in caplog.text
    assert live_workers(conn) == []


def test_jobs_with_different_samplers_share_a_batch_and_report_the_one_that_ran(conn, settings):
    pipe = SamplingPipeline()
    pipe.has_sampler_head = True   # a model with a sampler head: "auto" runs it
    ids = {s: enqueue(conn, params(s, sampler=s)) for s in ("head", "plain", "auto")}
    ids["left out"] = enqueue(conn, params("left out"))   # a job queued by an API older than `sampler`
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["head", "plain", "auto", "left out"]]   # one model call, mixed rows
    assert [r.sampler for r in pipe.requests] == ["head", "plain", "head", "head"]
    storage = LocalStorage(settings.storage_dir, settings.public_base_url)
    for name, runs in (("head", "head"), ("plain", "plain"), ("auto", "head"), ("left out", "head")):
        view = state(conn, ids[name])
        assert view.status == "succeeded" and view.params["sampler"] == runs   # what GET /jobs/{id} shows
        assert Image.open(io.BytesIO(storage.get(view.images[0]["id"]))).text["sampler"] == runs   # and the PNG


def test_a_head_job_on_a_model_without_a_head_fails_alone_before_the_model_call(conn, settings):
    pipe = SamplingPipeline()
    head, auto = enqueue(conn, params("head", sampler="head")), enqueue(conn, params("auto", sampler="auto"))
    run(settings, pipeline=pipe, burst=True)
    assert pipe.batches == [["auto"]]
    failed = state(conn, head)
    assert failed.status == "failed" and failed.error["code"] == "invalid_request"
    assert "sampler 'head' needs a model with a sampler head; 'noop-64' has none" in failed.error["message"]
    assert state(conn, auto).status == "succeeded" and state(conn, auto).params["sampler"] == "plain"
