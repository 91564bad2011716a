"""Fast guidance through the service (real Redis, the API under uvicorn, one `python -m worker` on the
`tiny` preset with STAR_GUIDANCE_STOP_SCALE=8): the worker default, explicit values, the 422 for an
index outside the model's schedule, the job view, the PNG text chunks, GET /models, the OpenAI
route's extra body, the Python client and `star generate --guidance-stop-scale`."""
from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def service(new_redis_db, tmp_path_factory, worker_process, api_server):
    from app.settings import ApiSettings

    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("fastguide")
    worker = worker_process(redis_url, data / "images", data / "worker.log", env={
        "STAR_MODEL": "tiny", "STAR_MAX_WAIT_MS": "0", "STAR_WARMUP": "false", "STAR_GUIDANCE_STOP_SCALE": "8"})
    worker.start()
    try:
        with api_server(ApiSettings(redis_url=redis_url, storage_dir=data / "images")) as api:
            yield api
    finally:
        worker.stop()


def run(service, **body) -> dict:
    accepted = service.client.post("/generate", json={"prompt": PROMPT, "seed": 5, **body})
    assert accepted.status_code == 202, accepted.text
    url, deadline = f"/jobs/{accepted.json()['id']}", time.monotonic() + 120
    while (view := service.client.get(url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["status"] == "succeeded", view
    return view


def png(service, view) -> Image.Image:
    return Image.open(io.BytesIO(service.client.get(view["images"][0]["url"]).content))


def test_models_show_the_schedule_and_the_worker_default(service):
    (model,) = service.client.get("/models").json()["models"]
    assert (model["name"], model["scales"], model["guidance_stop_scale"]) == ("tiny", 10, 8)


def test_the_worker_default_applies_and_explicit_values_win(service):
    default = run(service)
    assert default["request"]["guidance_stop_scale"] == 8
    assert png(service, default).text["guidance_stop_scale"] == "8"
    full = run(service, guidance_stop_scale=10)          # the number of scales: guidance on every scale
    assert full["request"]["guidance_stop_scale"] == 10
    assert not np.array_equal(np.asarray(png(service, default)), np.asarray(png(service, full)))
    # the guidance ramp is 0 at scale 0: stopping at 0 or 1 makes the same image
    zero, one = run(service, guidance_stop_scale=0), run(service, guidance_stop_scale=1)
    assert np.array_equal(np.asarray(png(service, zero)), np.asarray(png(service, one)))


def test_an_index_outside_the_models_schedule_is_a_422_naming_the_field(service):
    for bad, says in ((11, "from 0 to 10: model tiny has 10 scales"), (65, "less than or equal to 64"),
                      (-1, "greater than or equal to 0")):
        response = service.client.post("/generate", json={"prompt": PROMPT, "guidance_stop_scale": bad})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["field"] == "guidance_stop_scale" and says in error["message"], error


def test_the_openai_route_takes_it_as_an_extra_field(service):
    response = service.client.post("/v1/images/generations", json={
        "prompt": PROMPT, "size": "256x256", "response_format": "b64_json", "guidance_stop_scale": 3})
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert image.text["guidance_stop_scale"] == "3"
    refused = service.client.post("/v1/images/generations", json={"prompt": PROMPT, "guidance_stop_scale": 11})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "guidance_stop_scale"


def test_the_python_client_and_the_cli(service, tmp_path, capsys):
    from app.cli import main
    from client import StarClient

    with StarClient(service.url) as star:
        result = star.generate(PROMPT, seed=1, guidance_stop_scale=2, poll_s=0.05, timeout=120)
        assert result.job.request.guidance_stop_scale == 2
        (model,) = star.models().models
        assert (model.scales, model.guidance_stop_scale) == (10, 8)
    assert main(["generate", PROMPT, "--server", service.url, "--guidance-stop-scale", "4",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert "no guidance from scale 4" in capsys.readouterr().err
    assert Image.open(tmp_path / "out.png").text["guidance_stop_scale"] == "4"
