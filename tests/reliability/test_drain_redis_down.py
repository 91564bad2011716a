"""A worker told to stop while Redis is down (stopped, or paused so that it never answers) still
exits within its drain grace plus a bounded margin, or soon after a second signal; the job it could
not record is re-queued by the reaper once Redis is back, and finishes elsewhere. Real Redis servers
of the test's own, the API under uvicorn, worker subprocesses (noop pipeline, slowed)."""
from __future__ import annotations

import signal
import subprocess
import time

import pytest
from rq.job import Job

from app.jobs.rq_adapter import SERIALIZER, connect
from app.redis_server import RedisServer
from worker.stopping import EXIT_FORCED, Stop

EXIT_WITHIN_S = 120   # generous: the bound is the grace + 15 s; before the fix it took about 5 minutes


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test only (append-only persistence), so the test can stop and restart it."""
    server = RedisServer(appendonly=True, data_dir=tmp_path / "redis").start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


@pytest.fixture
def workers(worker_process, own_redis, tmp_path, h):
    """`start(name, **env)`: a worker subprocess on own_redis; all are stopped after the test."""
    started = []

    def start(name: str, **env):
        worker = worker_process(own_redis.url, tmp_path / "images", tmp_path / f"{name}.log",
                                script=[h.FAULTY_WORKER], env={**h.FAST_WORKER, **env}, name=name)
        started.append(worker)
        return worker.start()
    yield start
    for worker in started:
        worker.stop(timeout=10)


@pytest.mark.parametrize("outage, grace_s, signals, exit_code", [
    ("stopped", "2", 1, 0),              # Redis refuses connections: the retries give up, a clean exit
    ("paused", "600", 2, EXIT_FORCED),   # Redis accepts but never answers: the second signal is honoured
])
def test_a_worker_stopped_while_redis_is_down_exits_and_its_job_runs_elsewhere(
        outage, grace_s, signals, exit_code, own_redis, workers, tmp_path, api_server, h):
    from app.settings import ApiSettings

    worker = workers("stopping", TEST_SCALE_DELAY_MS="400", STAR_DRAIN_GRACE_S=grace_s)
    with api_server(ApiSettings(redis_url=own_redis.url, storage_dir=tmp_path / "images", reaper_s=0.5)) as api:
        job_id = h.post(api.client, "a lighthouse in a storm")
        h.wait_job(api.client, job_id, h.running_at(1))
        if outage == "stopped":
            own_redis.stop()                                   # SIGTERM: it writes its append-only file
        else:
            own_redis.process.send_signal(signal.SIGSTOP)
        for _ in range(signals):
            worker.process.send_signal(signal.SIGTERM)
            time.sleep(1.5)                                    # not a duplicate of the first
        try:
            code = worker.process.wait(EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker did not exit within {EXIT_WITHIN_S}s:\n{worker.tail()}")
        assert code == exit_code, worker.tail()
        assert "left for the reaper" in worker.tail()
        if outage == "stopped":
            own_redis.start()                                  # same port, same data directory
        else:
            own_redis.process.send_signal(signal.SIGCONT)

        workers("next")
        view = h.wait_job(api.client, job_id, timeout=90)
        assert view["status"] == "succeeded" and len(view["images"]) == 1, view
        assert len(h.stored_pngs(tmp_path / "images")) == 1     # the stopped worker published nothing
        if outage == "stopped":   # (a paused Redis may still run the release the worker had sent)
            meta = Job.fetch(job_id, connection=connect(own_redis.url), serializer=SERIALIZER).meta
            assert meta.get("requeues") == 1                   # taken back by the reaper, once


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_stop_gives_up_on_redis_then_exits_at_its_bounds():
    """The schedule of worker.stopping.Stop, on a fake clock: give up on Redis GIVE_UP_S after the
    grace (or at a second signal), exit EXIT_S later if still alive; a duplicate signal is ignored."""
    from worker.stopping import EXIT_S, GIVE_UP_S

    clock, exits = FakeClock(), []
    stop = Stop(grace_s=30, clock=clock, exit=exits.append)
    stop.check()
    assert not stop.requested and not stop.give_up.is_set()
    stop.signal()
    clock.now += 0.2
    stop.signal()                                # the same stop forwarded twice (terminal + supervisor)
    clock.now += 30 + GIVE_UP_S - 0.3
    stop.check()
    assert stop.requested and not stop.give_up.is_set() and exits == []
    clock.now += 0.2
    stop.check()
    assert stop.give_up.is_set() and exits == []
    clock.now += EXIT_S
    stop.check()
    assert exits == [EXIT_FORCED]

    clock, exits = FakeClock(), []
    forced = Stop(grace_s=600, clock=clock, exit=exits.append)
    forced.signal()
    clock.now += 2
    forced.signal()                              # a second signal: give up at once
    forced.check()
    assert forced.give_up.is_set() and exits == []
    clock.now += EXIT_S
    forced.check()
    assert exits == [EXIT_FORCED]
