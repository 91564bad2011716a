"""GET /jobs/{id}/events: Server-Sent Events read by a plain HTTP client, as a browser's
EventSource would read them."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx


def events(response: httpx.Response) -> Iterator[tuple[str, object]]:
    """(event name, parsed data) per event; ("comment", text) per comment line."""
    name, data = "message", []
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


def test_a_job_streams_progress_then_its_result_and_the_stream_ends(stack):
    job_id = stack.client.post("/generate", json={"prompt": "a comet over a harbor", "seed": 5}).json()["id"]
    with httpx.stream("GET", f"{stack.url}/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = [(name, data) for name, data in events(response) if name != "comment"]
    names = [name for name, _ in received]
    assert names[-1] == "succeeded" and set(names[:-1]) <= {"queued", "running"}
    scales = [data["progress"]["scale"] for name, data in received if name == "running" and data["progress"]]
    assert scales and scales == sorted(scales) and len(set(scales)) == len(scales)
    final = received[-1][1]
    assert final == stack.client.get(f"/jobs/{job_id}").json()
    assert final["images"][0]["seed"] == 5


def test_an_unknown_job_is_404_in_the_usual_error_shape(stack):
    response = stack.client.get("/jobs/00000000-0000-4000-8000-000000000000/events")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_queue_position_heartbeats_and_cancel(idle_api):
    client = idle_api.client
    first, second = (client.post("/generate", json={"prompt": f"job {i}"}).json()["id"] for i in range(2))
    seen: list[tuple[str, object]] = []
    with httpx.stream("GET", f"{idle_api.url}/jobs/{second}/events", timeout=10) as response:
        for name, data in events(response):
            seen.append((name, data))
            if name == "comment" and sum(n == "comment" for n, _ in seen) == 2:
                threading.Thread(target=client.delete, args=(f"/jobs/{first}",)).start()
            if name == "queued" and data["queue_position"] == 0:
                client.delete(f"/jobs/{second}")
            if name == "canceled":
                break
    named = [(name, data.get("queue_position")) for name, data in seen if name != "comment"]
    assert named == [("queued", 1), ("queued", 0), ("canceled", None)]
    assert seen[-1][1]["status"] == "canceled" and seen[-1][1]["id"] == second
    assert ("comment", "ping") in seen
