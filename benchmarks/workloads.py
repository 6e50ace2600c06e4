"""Benchmark shapes and workloads as plain descriptions (numpy only).

Both sides of the training benchmark import this module: tfusion (jax) and the
transfusion-pytorch reference (torch, another venv), so they train on the same
samples and count useful tokens the same way. Nothing here imports jax or torch.

A sample is (caption_tokens, num_images). In tfusion's layout it is the document
  BOS caption BOI <image> EOI [BOI <image> EOI] EOS
so its text tokens are caption + 2 + 2 * num_images; the reference gets the caption
and the latents and adds its own start/end and modality markers. Useful tokens of a
sample = its text tokens + its patches, on both sides (padding never counts).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Shape:
    width: int
    depth: int
    heads: int
    mlp_hidden: int
    vocab: int
    latent: tuple[int, int, int]  # H, W, C of one image latent
    patch: int
    batch: int  # samples per step (fixed); rows per step (tfusion fixed)
    fixed_caption: int  # caption tokens of every fixed-scenario sample
    mix_caption: tuple[int, int]  # inclusive caption-length range of the mix
    mix_images: tuple[int, int]  # inclusive images-per-sample range of the mix
    mix_rows: int  # packed rows per tfusion mix step
    mix_seq_len: int  # row length tfusion packs the mix into
    mix_open_rows: int  # rows the packer keeps open (data.packing_open_rows)

    @property
    def patches(self) -> int:
        h, w, _ = self.latent
        return (h // self.patch) * (w // self.patch)

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.latent[2]

    @property
    def grid(self) -> tuple[int, int]:
        return self.latent[0] // self.patch, self.latent[1] // self.patch


SHAPES = {
    # Issue 8's benchmark shape: 56 text + 64 patches of dim 16 = 120 tokens/sample.
    # The mix (captions 8-120, 1-2 images: 77-254 tokens) is packed by the
    # framework's packer into 10 rows of 320 with 96 open rows: 97.6% non-pad in
    # steady state (measured; 8 x 384: 95.8%, 12 x 256: 91% with 192 open rows,
    # 85% with 96), and the dense CPU attention pays for every key of a row, so
    # 320 is the best tokens/s measured among 256/320/384/512. 3200 positions per
    # step, about what the reference pads 16 samples to (16 x ~250).
    "cpu-s": Shape(width=512, depth=8, heads=8, mlp_hidden=1408, vocab=1024,
                   latent=(16, 16, 4), patch=2, batch=16, fixed_caption=52,
                   mix_caption=(8, 120), mix_images=(1, 2), mix_rows=10, mix_seq_len=320,
                   mix_open_rows=96),
    # Seconds-long smoke shape (tests/experiments/test_benchmarks_smoke.py).
    "tiny": Shape(width=64, depth=2, heads=4, mlp_hidden=128, vocab=64,
                  latent=(4, 4, 4), patch=2, batch=4, fixed_caption=4,
                  mix_caption=(2, 8), mix_images=(1, 2), mix_rows=2, mix_seq_len=32,
                  mix_open_rows=8),
}

Sample = tuple[int, int]  # (caption_tokens, num_images)


def text_tokens(sample: Sample) -> int:
    caption, images = sample
    return caption + 2 + 2 * images


def useful_tokens(sample: Sample, shape: Shape) -> int:
    return text_tokens(sample) + sample[1] * shape.patches


def fixed_samples(shape: Shape, count: int) -> list[Sample]:
    return [(shape.fixed_caption, 1)] * count


def mix_samples(shape: Shape, count: int, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    lo, hi = shape.mix_caption
    ilo, ihi = shape.mix_images
    return [(int(rng.integers(lo, hi + 1)), int(rng.integers(ilo, ihi + 1)))
            for _ in range(count)]


def step_batches(count: int, size: int) -> list[list[int]]:
    """Consecutive groups of `size` sample indices (the reference's padded batches)."""
    return [list(range(i * size, (i + 1) * size)) for i in range(count)]
