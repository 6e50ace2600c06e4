"""Mixed-modal generation with a KV cache: text decoding, diffusion of images, CFG;
the discrete (Chameleon) baseline's images as sampled VQ codes.

Entry points: `engine.Engine` (jitted prefill / text step / diffusion step / code step over a
model), `generate.generate` (the interleaved text-and-image driver),
`samples.write_sample_grid` (what the trainer calls at train.sample_every).
"""
