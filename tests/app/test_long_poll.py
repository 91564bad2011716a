"""GET /jobs/{id}?wait=S: answers when the job ends (woken through Redis pub/sub, not by polling),
or after S seconds with the job as it is; S is bounded (STAR_LONG_POLL_MAX_S). The API runs under
uvicorn on a real Redis; its only 'worker' is a registry entry, so jobs stay queued until canceled
or past their deadline."""
from __future__ import annotations

import threading
import time

import pytest

from app import longpoll
from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker


@pytest.fixture
def api(make_api_settings, conn, api_server):
    publish_worker(conn, WorkerEntry(name="idle", model="tiny", state="ready", size=256, queue=queue_name("tiny")),
                   ttl_s=600)
    with api_server(make_api_settings(long_poll_max_s=30, job_deadline_s=3)) as server:
        yield server


def submit(api) -> str:
    answer = api.client.post("/generate", json={"prompt": "a red fox"})
    assert answer.status_code == 202, answer.text
    return answer.json()["id"]


@pytest.mark.parametrize("wait", ["31", "-1", "soon"])
def test_a_wait_out_of_range_is_422_naming_it(api, wait):
    answer = api.client.get(f"/jobs/{submit(api)}", params={"wait": wait})
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "wait" and "`wait`" in answer.json()["error"]["message"]


def test_an_unknown_job_is_404_at_once(api):
    answer = api.client.get("/jobs/00000000-0000-4000-8000-000000000000", params={"wait": 30})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"


def test_a_job_still_running_at_the_end_of_the_wait_is_answered_as_it_is(api):
    job_id = submit(api)
    started = time.monotonic()
    answer = api.client.get(f"/jobs/{job_id}", params={"wait": 0.5})
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    assert time.monotonic() - started >= 0.5
    assert api.client.get(f"/jobs/{job_id}", params={"wait": 0}).json()["status"] == "queued"   # 0: at once


def test_the_end_of_a_job_wakes_its_waiters(api, monkeypatch):
    """With the periodic re-read pushed out of reach, only the end notice can answer the waits."""
    monkeypatch.setattr(longpoll, "RECHECK_S", 1000.0)
    job_id = submit(api)
    answers: list = []

    def wait() -> None:
        answers.append(api.client.get(f"/jobs/{job_id}", params={"wait": 30}))
    waiters = [threading.Thread(target=wait) for _ in range(3)]
    for thread in waiters:
        thread.start()
    time.sleep(0.3)   # let them register (a wait that starts after the cancel answers at once anyway)
    assert api.client.delete(f"/jobs/{job_id}").status_code == 200
    for thread in waiters:
        thread.join(25)
    assert [a.json()["status"] for a in answers] == ["canceled"] * 3


def test_a_queued_job_that_passes_its_deadline_ends_the_wait_as_expired(api):
    """No write marks it expired (it only reads as such): the waiter's re-read finds it."""
    answer = api.client.get(f"/jobs/{submit(api)}", params={"wait": 25})
    assert answer.json()["status"] == "expired"
