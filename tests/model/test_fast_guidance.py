"""Fast guidance (ImageRequest.cfg_stop_scale): the conditional row alone from the stop scale on,
off by default, batch invariant in batches mixing it with guided images and sampler-head images."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from model.pipeline import ImageRequest, StarPipeline

S = 10   # scales of the tiny presets (256 px schedule)


def _run(pipe, requests, **kw):
    cond, _ = pipe.encode_prompts([r.prompt for r in requests], [r.negative_prompt for r in requests])
    return pipe.sample_tokens(cond, requests, **kw)


def _rows_per_scale(pipe, requests):
    rows: dict[int, int] = {}
    out = _run(pipe, requests, on_logits=lambda si, lg: rows.__setitem__(si, lg.shape[0]))
    return out, [rows[si] for si in range(S)]


def test_default_and_stop_at_the_last_index_are_the_official_sampling(tiny_pipe):
    base = ImageRequest("a red house", seed=3, cfg=4.0)
    official, rows = _rows_per_scale(tiny_pipe, [base])
    assert rows == [2] * S
    for stop in (None, S):
        again, rows = _rows_per_scale(tiny_pipe, [dataclasses.replace(base, cfg_stop_scale=stop)])
        assert rows == [2] * S
        assert torch.equal(again.f_hat_NChw, official.f_hat_NChw)


def test_from_the_stop_scale_on_only_the_conditional_row_runs_and_is_drawn_from(tiny_pipe):
    """Greedy draws (top_k=1): before the stop the token is the guided argmax, from it on the
    conditional row's argmax; the earlier scales are those of full guidance."""
    req = ImageRequest("a red house", seed=3, cfg=4.0, top_k=1, cfg_stop_scale=6)
    logits = {}
    out = _run(tiny_pipe, [req], on_logits=lambda si, lg: logits.__setitem__(si, lg.clone()))
    full = _run(tiny_pipe, [dataclasses.replace(req, cfg_stop_scale=None)])
    assert [logits[si].shape[0] for si in range(S)] == [2] * 6 + [1] * 4
    for si in range(6):
        assert torch.equal(out.idx_per_scale[si], full.idx_per_scale[si]), si
    for si in range(6, S):
        assert torch.equal(out.idx_per_scale[si][0], logits[si][0].argmax(-1)), si
    assert not torch.equal(out.idx_per_scale[-1], full.idx_per_scale[-1])


def test_stop_at_0_and_1_give_the_same_image(tiny_pipe):
    """The guidance ramp is t = cfg * si / (S - 1): zero at scale 0, so stopping there changes nothing
    but the work (no unconditional row at all)."""
    req = ImageRequest("a boat", seed=11, cfg=5.0, negative_prompt="fog")
    zero, rows = _rows_per_scale(tiny_pipe, [dataclasses.replace(req, cfg_stop_scale=0)])
    one = _run(tiny_pipe, [dataclasses.replace(req, cfg_stop_scale=1)])
    assert rows == [1] * S
    assert torch.equal(zero.f_hat_NChw, one.f_hat_NChw)


def test_mixed_stops_are_batch_invariant(tiny_pipe):
    reqs = [ImageRequest("a cat on a sofa", seed=1234, cfg=3.0, top_k=40, top_p=0.9, cfg_stop_scale=3),
            ImageRequest("a dog", seed=1, cfg=6.0, top_k=0, top_p=0.0),                      # guided throughout
            ImageRequest("mountains at dawn", seed=2, negative_prompt="blurry", top_k=5, cfg_stop_scale=7),
            ImageRequest("a cat on a sofa", seed=99, cfg=6.0, cfg_stop_scale=0),
            ImageRequest("a lake", seed=5, cfg=2.0, temperature=0.7, cfg_stop_scale=7)]
    batch, rows = _rows_per_scale(tiny_pipe, reqs)
    # unconditional rows: 4 up to scale 2, 3 from scale 3, 1 from scale 7 (the guided dog)
    assert rows == [5 + 4] * 3 + [5 + 3] * 4 + [5 + 1] * 3
    for i, req in enumerate(reqs):
        alone = _run(tiny_pipe, [req])
        for si in range(S):
            assert torch.equal(batch.idx_per_scale[si][i], alone.idx_per_scale[si][0]), (i, si)
        assert torch.equal(batch.f_hat_NChw[i], alone.f_hat_NChw[0]), i


def test_an_index_outside_the_schedule_is_refused(tiny_pipe):
    for bad in (-1, S + 1):
        with pytest.raises(ValueError, match="cfg_stop_scale must be a scale index from 0 to 10"):
            _run(tiny_pipe, [ImageRequest("x", seed=1, cfg_stop_scale=bad)])


@pytest.fixture(scope="module")
def head_pipe():
    return StarPipeline.load("tiny-sampler")   # scales 7-9 refined by the sampler head


def test_sampler_head_guidance_stops_too_and_mixed_batches_are_invariant(head_pipe):
    """On refined scales at or after its stop, a head image's sampler-head logits come from its
    conditional row only; head and plain images with and without a stop batch invariantly."""
    reqs = [ImageRequest("a cat", seed=4, cfg=3.0, top_k=40, top_p=0.9, sampler="head", cfg_stop_scale=8),
            ImageRequest("a dog", seed=1, cfg=2.0, top_k=40, sampler="plain", cfg_stop_scale=5),
            ImageRequest("hills", seed=2, negative_prompt="blurry", top_k=5, sampler="head"),
            ImageRequest("a ship", seed=3, cfg=4.0, top_k=40, sampler="head", cfg_stop_scale=4)]
    head_rows: dict[tuple[int, int], int] = {}
    batch = _run(head_pipe, reqs, on_head_logits=lambda si, step, lg: head_rows.setdefault((si, step), lg.shape[0]))
    # head images 0, 2, 3: 3 conditional rows, unconditional rows of 0 and 2 on scale 7, of 2 on 8 and 9
    assert {si: n for (si, _), n in head_rows.items()} == {7: 3 + 2, 8: 3 + 1, 9: 3 + 1}
    for i, req in enumerate(reqs):
        alone = _run(head_pipe, [req])
        for si in range(S):
            assert torch.equal(batch.idx_per_scale[si][i], alone.idx_per_scale[si][0]), (i, si)
    guided = _run(head_pipe, [dataclasses.replace(reqs[0], cfg_stop_scale=None)])
    assert [torch.equal(guided.idx_per_scale[si][0], batch.idx_per_scale[si][0]) for si in range(8)] == [True] * 8
    assert not torch.equal(guided.idx_per_scale[-1][0], batch.idx_per_scale[-1][0])
