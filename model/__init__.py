"""STAR in pure PyTorch: config presets, text encoder, VQ-VAE, transformer, sampler, pipeline.

No environment variables, no Redis, no HTTP here.

Shape legend used in names (VAR's convention):
    B  batch rows (2 per image when guidance runs conditional + unconditional)
    L  all tokens of all scales;  l  tokens of one scale (pn*pn)
    C  transformer width;  D  text width;  T  text tokens (77)
    H  heads;  c  head dim;  V  codebook size;  Cvae  VQ latent channels
    e.g. x_BLC, ctx_BTD, idx_Bl, logits_BlV, f_hat_BChw.
A trailing underscore marks a function that mutates its argument (`write_kv_`).
"""
