"""POST /v1/images/generations with the official `openai` SDK, only `base_url` changed."""
from __future__ import annotations

import base64
import io
import re

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the dev extra pins `openai`: pip install -e '.[dev]'")


@pytest.fixture
def sdk(stack):
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="not-checked-yet")
    yield client
    client.close()


def png(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_b64_json_with_the_fields_the_sdk_sends(sdk):
    result = sdk.images.generate(prompt="a red fox in snow", n=2, size="256x256", response_format="b64_json",
                                 model="dall-e-3", quality="standard", style="vivid", user="tester",
                                 extra_body={"seed": 11, "negative_prompt": "fog"})
    assert isinstance(result, openai.types.ImagesResponse) and result.created > 0
    images = [png(base64.b64decode(item.b64_json)) for item in result.data]
    assert [image.size for image in images] == [(256, 256), (256, 256)]
    assert [image.text["seed"] for image in images] == ["11", "12"]
    assert images[0].text["negative_prompt"] == "fog" and images[0].text["sampler"] == "plain"   # auto on tiny


def test_url_is_the_default_and_the_url_serves_the_png(sdk):
    result = sdk.images.generate(prompt="a lighthouse at dusk", model="tiny")   # a served model: its size
    (item,) = result.data
    assert item.b64_json is None and result.size == "256x256"
    response = httpx.get(item.url)
    assert response.status_code == 200 and png(response.content).size == (256, 256)


@pytest.mark.parametrize("kwargs, param, text", [
    ({"size": "512x512"}, "size", "size 512 is not served; served sizes: 256"),
    ({"size": "256x128"}, "size", "square 'WxH' with W == H; served sizes: 256x256"),
    ({"size": "large"}, "size", "square 'WxH'"),
    ({"n": 5}, "n", "from 1 to 4"),
    ({"response_format": "webp"}, "response_format", "'url' or 'b64_json'"),
    ({"prompt": "   "}, "prompt", "non-whitespace"),
    ({"extra_body": {"sampler": "head"}}, "sampler", "sampler 'head' needs a model with a sampler head"),
    ({"extra_body": {"sampler": "fast"}}, "sampler", "one of auto, head, plain"),
])
def test_invalid_requests_are_400_in_openais_error_shape(sdk, kwargs, param, text):
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.images.generate(**{"prompt": "a fox", **kwargs})
    error = caught.value
    assert error.status_code == 400 and error.param == param and text in error.message
    assert set(error.body) == {"message", "type", "param", "code"} and error.type == "invalid_request_error"


def test_a_wait_past_the_timeout_is_504_once_and_the_job_is_canceled(stack, api_server, monkeypatch, wait_until):
    from app.settings import ApiSettings

    monkeypatch.setenv("STAR_OPENAI_TIMEOUT_S", "0.3")
    with api_server(ApiSettings(redis_url=stack.redis_url, storage_dir=stack.data / "images")) as api:
        client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="x", max_retries=2)
        with pytest.raises(openai.InternalServerError) as caught:
            client.images.generate(prompt="slow", n=4)
        assert caught.value.status_code == 504 and caught.value.code == "timeout"
        job_id = re.search(r"job ([0-9a-f-]{36})", caught.value.message).group(1)
        metrics = api.client.get("/metrics").text
        assert 'route="/v1/images/generations",status="504"} 1.0' in metrics   # the SDK did not retry
        status = wait_until(lambda: api.client.get(f"/jobs/{job_id}").json()["status"] not in ("queued", "running")
                            and api.client.get(f"/jobs/{job_id}").json()["status"], what="the job to end")
        assert status == "canceled"


def test_a_caller_that_goes_away_has_its_job_canceled(idle_api, wait_until):
    from rq.registry import CanceledJobRegistry

    from app.jobs.rq_adapter import get_queue

    with pytest.raises(httpx.TimeoutException):   # no worker runs it: the caller gives up
        httpx.post(f"{idle_api.url}/v1/images/generations", json={"prompt": "never mind"}, timeout=0.5)
    queue = get_queue(idle_api.conn, "tiny")
    wait_until(lambda: CanceledJobRegistry(queue=queue).get_job_ids(), timeout=5, what="the job to be canceled")
    assert queue.count == 0
