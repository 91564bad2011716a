"""Batched VQ decode on CPU in float32 gives every image bit for bit what decoding it alone gives,
with one thread and with several; the pipeline batches the decode only where that holds."""
from __future__ import annotations

import pytest
import torch

from model.pipeline import ImageRequest, decode_chunk_for


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_batch_of_8_decodes_each_image_exactly_as_alone(tiny_pipe, threads, n_threads):
    threads(n_threads)
    # 8x8 latents -> 128 px: the first convolutions see maps small enough for torch's size-based
    # algorithm choice, the last GroupNorms maps large enough for its thread-split kernel
    f_hat = torch.randn(8, tiny_pipe.cfg.vae_channels, 8, 8, generator=torch.Generator().manual_seed(n_threads))
    batched = tiny_pipe.decode(f_hat, chunk=8)
    alone = torch.cat([tiny_pipe.decode(f_hat[i:i + 1], chunk=1) for i in range(8)])
    assert batched.shape == (8, 3, 128, 128)
    assert torch.equal(batched, alone)
    assert not torch.equal(batched[0], batched[1])            # really eight different images


def test_the_decode_batch_is_chosen_per_device_and_dtype(tiny_pipe):
    assert tiny_pipe.decode_chunk == 8 == decode_chunk_for(torch.device("cpu"), torch.float32)
    assert decode_chunk_for(torch.device("cuda"), torch.float32) == 1     # not proven on CUDA
    assert decode_chunk_for(torch.device("cpu"), torch.bfloat16) == 1     # only float32 was proven
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        tiny_pipe.decode(torch.zeros(1, tiny_pipe.cfg.vae_channels, 2, 2), chunk=0)


def test_generated_image_is_the_same_alone_and_in_a_batch(tiny_pipe):
    pipe = tiny_pipe
    target = ImageRequest("a red square", seed=7)
    alone = pipe.generate([target])[0].image
    batch = pipe.generate([ImageRequest("a blue circle", seed=1), target, ImageRequest("noise", seed=3)])
    assert (alone == batch[1].image).all()
