"""What a client is told when its request is wrong, against a real Redis with registry entries standing
in for workers: bodies that are not JSON objects, strict JSON types, out-of-range and non-finite
numbers, the sizes served, and the headers of 405 and 503 answers."""
from __future__ import annotations

import math

import pytest
from fastapi.testclient import TestClient

from app.jobs.rq_adapter import queue_name
from app.jobs.workers import WorkerEntry, publish_worker

PROMPT = "a red circle on a blue background"
JSON = {"content-type": "application/json"}


def publish(conn, name="w1", model="shapes", size=128):
    publish_worker(conn, WorkerEntry(name=name, model=model, state="ready", size=size, queue=queue_name(model)),
                   ttl_s=60)


@pytest.fixture
def client(make_api_settings):
    from app.main import create_app

    with TestClient(create_app(make_api_settings(retry_after_s=7))) as client:
        yield client


def error_of(response, status: int = 422, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    return error["message"]


@pytest.mark.parametrize("headers, expect", [
    ({}, "sent with no Content-Type header"),
    ({"content-type": "application/x-www-form-urlencoded"},   # curl -d without -H
     "sent with Content-Type: application/x-www-form-urlencoded"),
    ({"content-type": "text/plain"}, "sent with Content-Type: text/plain"),
])
def test_a_json_body_without_the_json_content_type_is_told_to_send_the_header(client, conn, headers, expect):
    publish(conn)
    message = error_of(client.post("/generate", content=b'{"prompt": "a red circle on a blue background"}',
                                   headers=headers))
    assert expect in message and "send the header Content-Type: application/json" in message
    assert client.post("/generate", json={"prompt": PROMPT}).status_code == 202   # the same body, as JSON


def test_an_empty_body_is_called_empty(client, conn):
    publish(conn)
    for body in (b"", None):
        message = error_of(client.post("/generate", content=body, headers=JSON))
        assert message.startswith("the request body is empty") and '{"prompt": ' in message
        assert "None" not in message


@pytest.mark.parametrize("body, where", [
    ('{"prompt": "a red circle",\n "n": }', "line 2, column 7 (character 33)"),
    ('{"prompt": "a red circle" "n": 1}', "line 1, column 27 (character 26)"),
    ("{'prompt': 'x'}", "line 1, column 2 (character 1)"),
])
def test_malformed_json_is_located(client, conn, body, where):
    publish(conn)
    message = error_of(client.post("/generate", content=body.encode(), headers=JSON))
    assert message.startswith("the body is not valid JSON: ") and where in message, message


@pytest.mark.parametrize("body, expect", [("[1, 2]", "it is a list"), ("null", "it is null"),
                                          ('"a red circle"', "it is a string")])
def test_json_that_is_not_an_object_says_what_it_is(client, conn, body, expect):
    publish(conn)
    message = error_of(client.post("/generate", content=body.encode(), headers=JSON))
    assert message.startswith("the body must be a JSON object") and expect in message


@pytest.mark.parametrize("field, value, expect", [
    ("n", "true", "valid integer"),
    ("n", '"2"', "valid integer"),
    ("n", "2.0", "valid integer"),
    ("seed", '"7"', "valid integer"),
    ("top_k", "false", "valid integer"),
    ("guidance_scale", '"3"', "valid number"),
    ("guidance_scale", "true", "valid number"),
    ("prompt", "5", "valid string"),
])
def test_types_are_strict_as_json_has_them(client, conn, field, value, expect):
    publish(conn)
    body = {"prompt": f'"{PROMPT}"', field: value}
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}"
    message = error_of(client.post("/generate", content=text.encode(), headers=JSON), field=field)
    assert f"`{field}`" in message and expect in message


def test_a_number_field_takes_an_integer(client, conn):
    publish(conn)
    response = client.post("/generate", json={"prompt": PROMPT, "guidance_scale": 2, "top_p": 1})
    assert response.status_code == 202, response.text
    request = client.get(f"/jobs/{response.json()['id']}").json()["request"]
    assert request["guidance_scale"] == 2.0 and request["top_p"] == 1.0


@pytest.mark.parametrize("size, expect", [
    ('"128"', "not the string '128'"),
    ('"128x128"', "not the string '128x128' (the \"WxH\" form is for POST /v1/images/generations)"),
    ("128.0", "valid integer"),
    ("5000", "less than or equal to 4096"),
])
def test_a_bad_size_is_told_the_sizes_served_now(client, conn, size, expect):
    publish(conn, "a", "shapes", 128)
    publish(conn, "b", "tiny", 256)
    text = f'{{"prompt": "{PROMPT}", "size": {size}}}'
    message = error_of(client.post("/generate", content=text.encode(), headers=JSON), field="size")
    assert expect in message and "a size served now, as an integer: 128, 256" in message, message
    assert client.post("/generate", json={"prompt": PROMPT, "size": 128}).status_code == 202


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers_are_called_not_finite(client, conn, value):
    publish(conn)
    text = f'{{"prompt": "{PROMPT}", "guidance_scale": {value}}}'
    message = error_of(client.post("/generate", content=text.encode(), headers=JSON), field="guidance_scale")
    assert "finite number" in message and "less than" not in message


@pytest.mark.parametrize("field, digits, expect", [
    ("seed", "9" * 4400, "less than or equal to 4294967295"),
    ("top_k", "-" + "9" * 5000, "greater than or equal to 0"),
    ("n", "1" + "0" * 30, "less than or equal to 4"),
])
def test_a_huge_integer_is_out_of_range_of_its_field(client, conn, field, digits, expect):
    """Python refuses to convert integers of more than 4300 digits: the body is still JSON, and
    the field is told its range."""
    publish(conn)
    text = f'{{"prompt": "{PROMPT}", "{field}": {digits}}}'
    message = error_of(client.post("/generate", content=text.encode(), headers=JSON), field=field)
    assert expect in message and "JSON object" not in message


def test_negative_zero_is_recorded_as_zero(client, conn):
    publish(conn)
    text = f'{{"prompt": "{PROMPT}", "guidance_scale": -0.0, "top_p": -0.0}}'
    response = client.post("/generate", content=text.encode(), headers=JSON)
    assert response.status_code == 202, response.text
    view = client.get(f"/jobs/{response.json()['id']}")
    request = view.json()["request"]
    assert math.copysign(1.0, request["guidance_scale"]) == 1.0 and math.copysign(1.0, request["top_p"]) == 1.0
    assert "-0.0" not in view.text


@pytest.mark.parametrize("method, path, allow", [
    ("PUT", "/jobs/0b8f7c7e-9a58-4b8e-9f0e-2b6a8f0d1c2e", "DELETE, GET"),
    ("POST", "/healthz", "GET"),
    ("GET", "/generate", "POST"),
    ("DELETE", "/images/abc.png", "GET"),
    ("POST", "/static/app.js", "GET, HEAD"),
])
def test_405_names_every_allowed_method(client, method, path, allow):
    response = client.request(method, path)
    message = error_of(response, 405)
    assert response.headers["allow"] == allow
    assert message == f"{method} is not allowed on {path}; allowed: {allow}"


def test_every_503_says_when_to_retry(client, make_api_settings):
    """No worker (POST, /readyz, the OpenAI route) and Redis down: each 503 has Retry-After."""
    for response in (client.post("/generate", json={"prompt": PROMPT}), client.get("/readyz"),
                     client.post("/v1/images/generations", json={"prompt": PROMPT})):
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "7"          # STAR_RETRY_AFTER_S
    from app.main import create_app
    from app.redis_server import free_port

    down = make_api_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(down)) as without_redis:
        for response in (without_redis.post("/generate", json={"prompt": PROMPT}), without_redis.get("/readyz"),
                         without_redis.post("/v1/images/generations", json={"prompt": PROMPT})):
            assert response.status_code == 503 and int(response.headers["retry-after"]) > 0, response.text


def test_the_openai_route_reads_bodies_the_same_way(client, conn):
    publish(conn)
    response = client.post("/v1/images/generations", content=b'{"prompt": "x",\n "n": }', headers=JSON)
    assert response.status_code == 400
    assert "line 2, column 7 (character 22)" in response.json()["error"]["message"]
    response = client.post("/v1/images/generations", json={"prompt": PROMPT, "n": True})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_the_schema_lists_every_answer_of_cancel(client):
    responses = client.get("/openapi.json").json()["paths"]["/jobs/{job_id}"]["delete"]["responses"]
    assert {"200", "202", "404", "409"} <= set(responses)
    assert responses["202"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobView"}
