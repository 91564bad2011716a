"""The per-request sampler end to end (real Redis, the API under uvicorn, two `python -m worker`
subprocesses): `tiny-sampler` (the real model code with a sampler head, random weights, 256 px) and
the no-op pipeline at 128 px (no head). GET /models says which has a head; `head` where no model of
the size has one is 422 naming `sampler`; `auto` runs the head where there is one, else plain; the
job record, the PNG, the OpenAI route, the Python client and `star generate` all show what ran.
"""
from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def service(new_redis_db, tmp_path_factory, worker_process, api_server):
    from app.settings import ApiSettings

    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("sampler")
    workers = [worker_process(redis_url, data / "images", data / f"{model}.log", env={
        "STAR_MODEL": model, "STAR_MAX_WAIT_MS": "0", "STAR_WARMUP": "false"}) for model in ("tiny-sampler", "noop:128")]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda worker: worker.start(), workers))
    try:
        with api_server(ApiSettings(redis_url=redis_url, storage_dir=data / "images")) as api:
            yield api
    finally:
        for worker in workers:
            worker.stop()


def run(service, **body) -> dict:
    """POST /generate, wait for the end; the final job view."""
    accepted = service.client.post("/generate", json={"prompt": PROMPT, "seed": 5, **body})
    assert accepted.status_code == 202, accepted.text
    url, deadline = f"/jobs/{accepted.json()['id']}", time.monotonic() + 120
    while (view := service.client.get(url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["status"] == "succeeded", view
    return view


def png_of(service, view: dict) -> Image.Image:
    return Image.open(io.BytesIO(service.client.get(view["images"][0]["url"]).content))


def test_models_say_which_has_a_sampler_head(service):
    models = {m["name"]: (m["size"], m["sampler_head"]) for m in service.client.get("/models").json()["models"]}
    assert models == {"tiny-sampler": (256, True), "noop-128": (128, False)}


def test_head_where_no_model_of_the_size_has_one_is_422_naming_sampler(service):
    response = service.client.post("/generate", json={"prompt": PROMPT, "size": 128, "sampler": "head"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("sampler_not_available", "sampler")
    assert "noop-128 (size 128) has none (sizes served by a model with one: 256" in error["message"]


def test_head_runs_the_sampler_head_and_the_job_and_png_say_so(service):
    head = run(service, size=256, sampler="head")
    assert (head["model"], head["request"]["sampler"]) == ("tiny-sampler", "head")
    png = png_of(service, head)
    assert png.text["sampler"] == "head" and json.loads(png.text["parameters"])["sampler"] == "head"
    plain = run(service, size=256, sampler="plain")
    assert plain["request"]["sampler"] == "plain" and png_of(service, plain).text["sampler"] == "plain"
    # same prompt and seed: the head's step-by-step refinement gives another image than plain sampling
    assert not np.array_equal(np.asarray(png), np.asarray(png_of(service, plain)))
    assert run(service, sampler="head")["model"] == "tiny-sampler"   # no size: the largest with a head


def test_auto_is_the_head_where_the_model_has_one_else_plain(service):
    on_head_model = run(service, size=256)
    assert on_head_model["request"]["sampler"] == "head" and png_of(service, on_head_model).text["sampler"] == "head"
    explicit = run(service, size=256, sampler="head")
    assert np.array_equal(np.asarray(png_of(service, on_head_model)), np.asarray(png_of(service, explicit)))
    on_plain_model = run(service, size=128, sampler="auto")
    assert on_plain_model["request"]["sampler"] == "plain" and png_of(service, on_plain_model).text["sampler"] == "plain"


def test_the_openai_route_takes_the_sampler_in_its_extra_body(service):
    response = service.client.post("/v1/images/generations", json={
        "prompt": PROMPT, "size": "256x256", "response_format": "b64_json", "sampler": "head"})
    assert response.status_code == 200, response.text
    assert response.json()["sampler"] == "head"
    png = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert png.text["sampler"] == "head"
    refused = service.client.post("/v1/images/generations", json={"prompt": PROMPT, "size": "128x128",
                                                                   "sampler": "head"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "sampler"


def test_the_python_client_and_the_cli_carry_the_sampler(service, tmp_path, capsys):
    from app.cli import main
    from client import StarClient, StarRequestError

    with StarClient(service.url) as star:
        result = star.generate(PROMPT, sampler="head", seed=1, poll_s=0.05, timeout=120)
        assert (result.job.model, result.job.request.sampler) == ("tiny-sampler", "head")
        assert {m.name: m.sampler_head for m in star.models().models} == {"tiny-sampler": True, "noop-128": False}
        with pytest.raises(StarRequestError) as refused:
            star.submit(PROMPT, size=128, sampler="head")
        assert refused.value.field == "sampler" and refused.value.status == 422
    assert main(["generate", PROMPT, "--server", service.url, "--size", "256", "--sampler", "plain",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert "; sampler plain" in capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").text["sampler"] == "plain"
