"""worker/speed.py: STAR_MAX_BATCH_AUTO sizes the batch from free memory, STAR_COMPILE compiles and
warms up every bucket at start; neither does anything by default or for the noop model."""
from __future__ import annotations

import pytest

import model.compile
import model.memory
from worker.settings import WorkerSettings
from model.memory import plan_for_pipeline
from worker.noop import NoopPipeline
from worker.speed import auto_max_batch, prepare_model


def test_defaults_change_nothing(tiny_pipe):
    settings = WorkerSettings()
    assert (settings.compile, settings.max_batch_auto, settings.memory_margin) == (False, False, 0.1)
    assert prepare_model(settings, tiny_pipe) is settings
    assert prepare_model(WorkerSettings(compile=True, max_batch_auto=True), NoopPipeline()).max_batch == 8


def test_auto_max_batch_from_free_memory(tiny_pipe):
    plan = plan_for_pipeline(tiny_pipe)
    free = int((plan.decode_bytes + 12.5 * plan.per_image_bytes) / 0.8)
    assert auto_max_batch(tiny_pipe, free, margin=0.2) == 12
    with pytest.raises(RuntimeError, match="not enough free GPU memory for one image"):
        auto_max_batch(tiny_pipe, plan.decode_bytes, margin=0.1)


def test_auto_applies_on_cuda_only(monkeypatch):
    from model.pipeline import StarPipeline

    tiny_pipe = StarPipeline.load("tiny")                                # its own: the cache is resized
    settings = WorkerSettings(max_batch_auto=True, max_batch=3)
    assert prepare_model(settings, tiny_pipe).max_batch == 3            # CPU: STAR_MAX_BATCH stays
    plan = plan_for_pipeline(tiny_pipe)
    monkeypatch.setattr(model.memory, "free_device_bytes", lambda device: plan.decode_bytes + 40 * plan.per_image_bytes)
    sized = prepare_model(settings, tiny_pipe)                            # as if CUDA reported that much free
    assert sized.max_batch == 35 and settings.max_batch == 3
    assert tiny_pipe.reserve(1).max_rows >= 70                            # its KV cache is reserved


def test_compile_compiles_and_warms_every_bucket(tiny_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(model.compile, "compile_pipeline", lambda pipe, buckets: calls.append(("compile", buckets)))
    monkeypatch.setattr(model.compile, "warm_up", lambda pipe, buckets: calls.append(("warm", buckets)) or {1: 0.1})
    prepare_model(WorkerSettings(compile=True, max_batch=6), tiny_pipe)
    assert calls == [("compile", (1, 2, 4, 6)), ("warm", (1, 2, 4, 6))]
