"""STAR in pure PyTorch: config presets, text encoder, VQ-VAE, transformer, sampler (+ sampler head), pipeline.

No environment variables, no Redis, no HTTP here.

Shape legend used in names (VAR's convention):
    B  batch rows (2 per image when guidance runs conditional + unconditional)
    L  all tokens of all scales;  l  tokens of one scale (pn*pn)
    C  transformer width;  D  text width;  T  text tokens (77)
    H  heads;  c  head dim;  V  codebook size;  Cvae  VQ latent channels
    e.g. x_BLC, ctx_BTD, idx_Bl, logits_BlV, f_hat_BChw.
A trailing underscore marks a function that mutates its argument (`write_kv_`).
N is the number of images of a batch (B = 2N rows: the N conditional rows, then the N
unconditional rows in the same order); Cv is short for Cvae. In the sampler head, a [B, 1 + l, C]
tensor (a text row before the scale's l positions) keeps the name x_BlC.

Public surface (see docs/model.md):
    model.pipeline   StarPipeline (load / encode_prompts / sample_tokens / decode / generate),
                     ImageRequest (its `sampler`: auto / head / plain), ImageResult
    model.config     StarConfig, SamplerHeadConfig, PRESETS, get_preset
    model.convert    main(argv)  -- `python -m model.convert` / `star convert`
    model.golden     main(argv)  -- `python -m model.golden DIR`
    model.weights    load_official (-> OfficialModel) and the errors WeightsError, ModelFileNotFoundError,
                     UntrustedPickleError, WeightsMismatchError
    model.text       TextEncoder, write_byte_level_clip_tokenizer
"""
