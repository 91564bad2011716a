"""Per-model sampling defaults end to end (real Redis, the API under uvicorn, two `python -m worker`
subprocesses): sampling fields a request leaves out run with the model directory's config.json
"sampling" block, else the service's global defaults; explicit values win; the job view, the PNG,
GET /models, the OpenAI route, the Python client and `star generate` all show what ran.

Models: `tuned`, a copy of the shipped `shapes` model (128 px) whose sampling block is replaced by
a partial one; `plain`, a model directory without a sampling block (the `tiny` preset's random
weights written out, 256 px).
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from app.schemas import DEFAULT_SAMPLING

TUNED_BLOCK = {"cfg": 2.5, "top_k": 7, "top_p": 0.5}           # no temperature: the global one
TUNED = {"guidance_scale": 2.5, "top_k": 7, "top_p": 0.5, "temperature": DEFAULT_SAMPLING["temperature"]}
KEYS = tuple(DEFAULT_SAMPLING)
PROMPT = "a red circle on a blue background"


def model_dirs(root):
    """(tuned, plain) model directories under root."""
    import torch

    from model.model_dir import read_config, resolve_model_path, write_model_dir
    from model.pipeline import StarPipeline

    tuned = root / "tuned"
    shutil.copytree(resolve_model_path("shapes"), tuned)
    config = read_config(tuned)
    config["sampling"] = TUNED_BLOCK
    (tuned / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    tiny = StarPipeline.from_preset("tiny")
    plain = write_model_dir(root / "plain", tiny.cfg, tiny.transformer.state_dict(), tiny.vae.state_dict(),
                            tiny.text_encoder, transformer_dtype=torch.float32)
    assert "sampling" not in read_config(plain)
    return tuned, plain


@pytest.fixture(scope="module")
def service(new_redis_db, tmp_path_factory, worker_process, api_server):
    from app.settings import ApiSettings

    redis_url, data = new_redis_db(), tmp_path_factory.mktemp("sampling")
    workers = [worker_process(redis_url, data / "images", data / f"{path.name}.log", env={
        "STAR_MODEL": str(path), "STAR_MAX_WAIT_MS": "0", "STAR_WARMUP": "false"}) for path in model_dirs(data)]
    with ThreadPoolExecutor(2) as pool:   # both load at once
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
    url, deadline = f"/jobs/{accepted.json()['id']}", time.monotonic() + 60
    while (view := service.client.get(url).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["status"] == "succeeded", view
    return view


def used(view: dict) -> dict:
    return {key: view["request"][key] for key in KEYS}


def png_parameters(png: bytes) -> dict:
    return json.loads(Image.open(io.BytesIO(png)).text["parameters"])


def test_models_advertise_their_sampling_defaults(service):
    models = {m["name"]: m for m in service.client.get("/models").json()["models"]}
    assert (models["tuned"]["size"], models["tuned"]["sampling"]) == (128, TUNED)
    assert (models["plain"]["size"], models["plain"]["sampling"]) == (256, DEFAULT_SAMPLING)


def test_a_request_without_sampling_fields_runs_with_the_models_defaults(service):
    view = run(service, size=128)
    assert view["model"] == "tuned" and used(view) == TUNED
    png = service.client.get(view["images"][0]["url"]).content
    assert {key: png_parameters(png)[key] for key in KEYS} == TUNED   # the image says the same


def test_explicit_values_override_the_models_defaults(service):
    view = run(service, size=128, guidance_scale=6.0, top_k=0, temperature=0.7)
    assert used(view) == {"guidance_scale": 6.0, "top_k": 0, "top_p": 0.5, "temperature": 0.7}


def test_a_model_without_a_sampling_block_gets_the_global_defaults(service):
    view = run(service, size=256, top_p=None)   # null is the same as leaving the field out
    assert view["model"] == "plain" and used(view) == DEFAULT_SAMPLING == {
        "guidance_scale": 4.0, "top_k": 600, "top_p": 0.8, "temperature": 1.0}


def test_the_openai_route_sends_no_defaults_of_its_own(service):
    def parameters(**body) -> dict:
        response = service.client.post("/v1/images/generations", json={
            "prompt": PROMPT, "size": "128x128", "response_format": "b64_json", **body})
        assert response.status_code == 200, response.text
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
        return {key: png_parameters(png)[key] for key in KEYS}

    assert parameters() == TUNED
    assert parameters(top_k=3, extra_field="ignored") == {**TUNED, "top_k": 3}


def test_the_python_client_and_the_cli_leave_the_defaults_to_the_model(service, tmp_path, capsys):
    from app.cli import main
    from client import StarClient

    with StarClient(service.url) as star:
        result = star.generate(PROMPT, size=128, seed=1, poll_s=0.05, timeout=60)
        assert {key: getattr(result.job.request, key) for key in KEYS} == TUNED
        assert {m.name: m.sampling for m in star.models().models} == {"tuned": TUNED, "plain": DEFAULT_SAMPLING}
    assert main(["generate", PROMPT, "--server", service.url, "--size", "128", "--top-k", "2",
                 "-o", str(tmp_path / "out.png")]) == 0
    assert "guidance 2.5, top-k 2, top-p 0.5, temperature 1" in capsys.readouterr().err
    assert png_parameters((tmp_path / "out.png").read_bytes())["top_k"] == 2
