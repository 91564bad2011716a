"""Pure parts of the worker: batching policy, PNG text chunks, the noop pipeline."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from worker.batcher import Collector
from model.request import ImageRequest
from worker.noop import NoopPipeline
from worker.png import encode_png, png_text


class FakeQueue:
    """Jobs are (name, images); `start` refuses names starting with 'x' (expired/canceled)."""

    def __init__(self, jobs, clock):
        self.jobs, self.clock, self.given_back, self.waits = list(jobs), clock, [], []

    def pull(self, timeout_s):
        self.waits.append(timeout_s)
        if self.jobs:
            return self.jobs.pop(0)
        self.clock.now += timeout_s   # waited in vain
        return None

    def give_back(self, job):
        self.given_back.append(job)
        self.jobs.insert(0, job)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


def collector(fake, clock, max_images=4, max_wait_s=0.05):
    return Collector(images_of=lambda j: j[1], pull=fake.pull, give_back=fake.give_back,
                     start=lambda j: None if j[0].startswith("x") else j, max_images=max_images,
                     max_wait_s=max_wait_s, clock=clock)


def test_batch_fills_up_to_max_images_and_gives_back_what_does_not_fit():
    clock = Clock()
    fake = FakeQueue([("b", 2), ("c", 3), ("d", 1)], clock)
    assert collector(fake, clock).collect(("a", 1)) == [("a", 1), ("b", 2)]
    assert fake.given_back == [("c", 3)] and fake.jobs[0] == ("c", 3)
    # the next batch starts with the job given back
    first = fake.jobs.pop(0)
    assert collector(fake, clock).collect(first) == [("c", 3), ("d", 1)]


def test_batch_stops_when_full_without_waiting():
    clock = Clock()
    fake = FakeQueue([("b", 3), ("c", 1)], clock)
    assert collector(fake, clock).collect(("a", 1)) == [("a", 1), ("b", 3)]
    assert fake.jobs == [("c", 1)]


def test_batch_waits_at_most_max_wait():
    clock = Clock()
    fake = FakeQueue([], clock)
    assert collector(fake, clock, max_wait_s=0.05).collect(("a", 1)) == [("a", 1)]
    assert fake.waits == [0.05] and clock.now == pytest.approx(0.05)


def test_a_request_larger_than_max_batch_runs_alone_and_refused_jobs_do_not_count():
    clock = Clock()
    fake = FakeQueue([("xb", 4), ("c", 2)], clock)
    assert collector(fake, clock).collect(("big", 6)) == [("big", 6)]
    assert collector(fake, clock).collect(("xa", 1)) == [("c", 2)]


def test_png_carries_prompt_seed_and_parameters():
    params = {"prompt": "a fox, ünïcødé 🦊", "negative_prompt": "blur", "size": 256, "n": 2, "seed": 10,
              "guidance_scale": 4.0, "top_k": 600, "top_p": 0.8, "temperature": 1.0, "sampler": "head"}
    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_png(pixels, png_text(params, 11, "tiny"))))
    assert image.format == "PNG" and image.size == (48, 32)
    assert np.array_equal(np.asarray(image), pixels)
    text = image.text
    assert text["prompt"] == params["prompt"] and text["seed"] == "11" and text["model"] == "tiny"
    assert {k: text[k] for k in ("negative_prompt", "size", "guidance_scale", "top_k", "top_p", "temperature",
                                 "sampler")} == \
        {"negative_prompt": "blur", "size": "256", "guidance_scale": "4.0", "top_k": "600", "top_p": "0.8",
         "temperature": "1.0", "sampler": "head"}
    assert json.loads(text["parameters"]) == {**{k: v for k, v in params.items() if k != "n"},
                                              "seed": 11, "model": "tiny"}
    assert "guidance_stop_scale" not in text     # fast guidance off: no chunk, as before it existed
    fast = png_text({**params, "guidance_stop_scale": 7}, 11, "tiny")
    assert fast["guidance_stop_scale"] == "7" and json.loads(fast["parameters"])["guidance_stop_scale"] == 7
    assert "guidance_stop_scale" not in png_text({**params, "guidance_stop_scale": None}, 11, "tiny")


def test_noop_pipeline_spec_size_and_cancel():
    pipe = NoopPipeline.from_spec("noop:512")
    assert (pipe.name, pipe.image_size, len(pipe.patch_nums)) == ("noop-512", 512, 10)
    seen = []
    out = pipe.generate([ImageRequest("a", 1), ImageRequest("b", 2)],
                        on_scale=lambda k, s: seen.append(k) or ([1] if k == 3 else None))
    assert seen == list(range(1, 11))
    assert out[0].image.shape == (512, 512, 3) and (out[0].image == 128).all() and not out[0].canceled
    assert out[1].image is None and out[1].canceled
    with pytest.raises(ValueError):
        NoopPipeline.from_spec("tiny")


def test_the_noop_pipeline_takes_the_sampler_choice_as_a_model_would():
    plain, head = NoopPipeline(64), NoopPipeline(64, sampler_head=True)
    assert (plain.has_sampler_head, head.has_sampler_head) == (False, True)
    assert [plain.resolve_sampler(s) for s in (None, "auto", "plain")] == ["plain"] * 3
    assert [head.resolve_sampler(s) for s in (None, "auto", "head", "plain")] == ["head", "head", "head", "plain"]
    assert len(head.generate([ImageRequest("a", 1, sampler="head"), ImageRequest("b", 2, sampler="plain")])) == 2
    with pytest.raises(ValueError, match="sampler 'head' needs a model with a sampler head; 'noop-64' has none"):
        plain.generate([ImageRequest("a", 1, sampler="head")])
    with pytest.raises(ValueError, match="sampler must be one of auto, head, plain, got 'fast'"):
        head.resolve_sampler("fast")


def test_model_sampling_defaults_and_filling_requests():
    from types import SimpleNamespace

    from app.jobs.claim import with_defaults
    from app.schemas import DEFAULT_SAMPLING
    from worker.sampling import model_defaults

    def defaults(sampling):
        return model_defaults(SimpleNamespace(sampling=sampling))

    assert defaults(None) == defaults({}) == model_defaults(object()) == DEFAULT_SAMPLING
    shapes = defaults({"cfg": 3, "top_k": 0, "top_p": 0.0, "temperature": 1})
    assert shapes == {"guidance_scale": 3.0, "top_k": 0, "top_p": 0.0, "temperature": 1.0}
    assert defaults({"top_k": 50}) == {**DEFAULT_SAMPLING, "top_k": 50}
    with pytest.raises(ValueError, match="unknown sampling default 'guidance'"):
        defaults({"guidance": 2})
    with pytest.raises(ValueError, match=r"temperature=0 is invalid.*greater than 0.0"):
        defaults({"temperature": 0})
    request = {"prompt": "x", "guidance_scale": None, "top_k": 5}
    assert with_defaults(request, shapes) == {"prompt": "x", "guidance_scale": 3.0, "top_k": 5, "top_p": 0.0,
                                              "temperature": 1.0}
    assert request == {"prompt": "x", "guidance_scale": None, "top_k": 5}   # not modified


def test_auto_becomes_the_models_sampler_when_a_job_starts_and_explicit_choices_stay():
    from app.jobs.claim import with_defaults
    from app.schemas import DEFAULT_SAMPLING
    from worker.sampling import job_defaults

    for pipe, auto in ((NoopPipeline(64), "plain"), (NoopPipeline(64, sampler_head=True), "head")):
        defaults = job_defaults(pipe)
        assert defaults == {**DEFAULT_SAMPLING, "sampler": auto}
        for asked, runs in (("auto", auto), (None, auto), ("plain", "plain"), ("head", "head")):
            assert with_defaults({"prompt": "x", "sampler": asked}, defaults)["sampler"] == runs
        assert with_defaults({"prompt": "x"}, defaults)["sampler"] == auto


def test_api_names_become_the_models_in_one_place():
    from worker.sampling import image_requests

    params = {"prompt": "a fox", "negative_prompt": "blur", "n": 2, "seed": 7, "guidance_scale": 2.5, "top_k": 3,
              "top_p": 0.5, "temperature": 0.9, "sampler": "head"}
    assert image_requests(params) == [
        ImageRequest("a fox", 7, "blur", cfg=2.5, top_k=3, top_p=0.5, temperature=0.9, sampler="head"),
        ImageRequest("a fox", 8, "blur", cfg=2.5, top_k=3, top_p=0.5, temperature=0.9, sampler="head")]
    assert image_requests({**params, "n": 1, "sampler": None})[0].sampler is None   # the model's "auto"
    fast = image_requests({**params, "n": 1, "guidance_stop_scale": 9})
    assert fast == [ImageRequest("a fox", 7, "blur", cfg=2.5, top_k=3, top_p=0.5, temperature=0.9, sampler="head",
                                 cfg_stop_scale=9)]


def test_worker_guidance_stop_default_is_checked_against_the_model():
    from worker.sampling import guidance_stop_default
    from worker.settings import WorkerSettings

    assert WorkerSettings().guidance_stop_scale is None
    assert WorkerSettings(guidance_stop_scale=8).guidance_stop_scale == 8
    assert guidance_stop_default(None, 14) is None and guidance_stop_default(14, 14) == 14
    with pytest.raises(ValueError, match=r"STAR_GUIDANCE_STOP_SCALE=11 .* 10 scales, so use 0 to 10"):
        guidance_stop_default(11, 10)


def test_the_global_sampling_defaults_are_the_pipelines_own_and_one_request_type_serves_both_pipelines():
    """One set of numbers: app.schemas.DEFAULT_SAMPLING = model.request.OFFICIAL_SAMPLING (what an
    unset ImageRequest field gets from a model without recommendations), mapped by worker.sampling;
    the no-op pipeline takes model.pipeline's ImageRequest, and importing it needs no torch."""
    import subprocess
    import sys

    from app.schemas import DEFAULT_SAMPLING, SAMPLERS
    from model import request
    from worker.sampling import API_NAMES

    assert {API_NAMES[k]: v for k, v in request.OFFICIAL_SAMPLING.items()} == DEFAULT_SAMPLING
    assert SAMPLERS == request.SAMPLERS == ("auto", "head", "plain")   # the API's sampler names are the model's
    code = ("import sys; import worker.noop, model.request; assert 'torch' not in sys.modules; "
            "from model.pipeline import ImageRequest; assert worker.noop.ImageRequest is ImageRequest")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
