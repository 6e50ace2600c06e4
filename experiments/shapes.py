"""Tiny experiments on the built-in `shapes` data that run on a laptop CPU."""
from __future__ import annotations

from data_pipelines.config import data_config, shapes_tiny_data
from experiments.base import base_config


def shapes_tiny():
    """~2M-param Transfusion on 16 px shapes whose samples follow their prompts after
    ~12 min on 2 CPU cores (docs/diffusion.md has the measurements behind each choice).

    The paper's recipe is kept where it learns at this size (DDPM, cosine, unweighted
    MSE, CFG 3); what differs, chosen by measurement on shapes:
      * v-prediction: epsilon's x0 estimate at high noise is worse than the data mean at
        3M parameters, so layouts never form (docs/diffusion.md);
      * diffusion times drawn logit-normal(0, 1) over the noise range (SD3), not
        uniformly: generation exact 0.97 / 0.94 against 0.67 / 0.70 (two seeds each) at
        2000 steps, captioning exact 0.875 / 0.89 against 0.81 / 0.86; uniform t spends few
        draws in the mid-range where a 16 px layout is decided;
      * EMA of the params (0.999 with warm-up) for sampling and evaluation;
      * patch 4 (16 patches per 16 px image): four times the caption-image pairs per
        step of patch 2, which is what a model seeing ~100K images needs most;
      * one shape per scene, 10% of tokens from text-only documents (paper: 50%) and 40%
        image-first pairs (paper: 20%), so that both directions get examples quickly;
      * sampling: 10 ancestral DDPM steps with CFG on noise levels s <= 0.95 (the
        guidance interval; the unconditional pass skipped above it), chosen from the
        steps-to-quality grid of benchmarks/sampling_quality.py on the README run
        (docs/diffusion.md#few-step-sampling): the best generation score at <= 25 steps
        (0.996 vs 0.980 for 250 DDPM steps, within the seed spread), the lowest pixel
        error to the prompt's scene, 1/24 of the 250-step time per image at cpu-s.
    """
    c = base_config()
    c.name = "shapes_tiny"
    c.data = shapes_tiny_data()
    c.data.update(shapes_max_per_image=1, text_token_share=0.1, image_first_fraction=0.4,
                  max_images_per_row=8)
    c.model.update(vocab_size=514, width=192, depth=4, num_heads=6, latent_height=16,
                   latent_width=16, latent_channels=3, patch_size=4,
                   timestep_embed_dim=64, dtype="float32", scan_layers=False)
    c.diffusion.update(prediction="v", sample_steps=10, cfg_interval=(0.0, 0.95),
                       timestep_sampling="logit_normal")
    # Held-out metrics and diagnostics (data.eval_batches batches) every 600 steps: seconds.
    c.train.update(steps=2000, batch_size=8, log_every=50, checkpoint_every=500,
                   sample_every=1000, eval_every=500, keep_checkpoints=2, ema_decay=0.999,
                   final_eval_suite="shapes",
                   sample_prompts=("a large red square at the top left", "a small blue circle",
                                   "a large green triangle at the center",
                                   "a small yellow square at the bottom right",
                                   "a large magenta circle at the right",
                                   "a small cyan triangle at the top",
                                   "a large blue square at the bottom",
                                   "a small red circle at the left"))
    c.optimizer.update(learning_rate=2e-3, warmup_steps=100, final_learning_rate=1e-4,
                       weight_decay=0.1)
    return c


def shapes_tiny_quick():
    """shapes_tiny for budgets of minutes (benchmarks/quality_vs_reference.py): the same
    model, trained the way the PyTorch peer is there: on caption -> image pairs only (no
    text-only documents, no image-first pairs); diffusion times drawn logit-normal around
    u = sigmoid(0.7) ~ 0.67 of the noise range (shapes_tiny: 0.5); 2 packed rows per
    step instead of 8 (about 15 pairs), a 20-step warm-up and a schedule over 6000 steps
    (~10 min of 0.1 s steps on 2 cores).

    Chosen by measurement (docs/benchmarks.md), mean attribute accuracy of the shapes
    suite's generation score, one seed each:
      * rows per step, README data mix and uniform t, after ~2 min: 8 rows 0.00,
        4 rows 0.03, 2 rows 0.18, 1 row 0.13 (more, smaller steps learn faster early);
      * at 2 rows, after ~85 s / ~115 s: README data mix with uniform t 0.05 / 0.09,
        with logit-normal t mean 0 0.16 / 0.26, mean 0.7 0.18 / 0.33; caption -> image
        only with uniform t 0.21 / 0.29; caption -> image only with logit-normal t
        mean 0.7 0.54 / 0.76 (mean 1.0: 0.55 / 0.83). Colour, size and place are
        decided at high noise, where uniform t spends few of its draws.
    """
    c = shapes_tiny()
    c.name = "shapes_tiny_quick"
    c.data.update(text_token_share=0.0, image_first_fraction=0.0)
    c.diffusion.logit_normal_mean = 0.7
    # The sampling its benchmark (quality_vs_reference) was measured with.
    c.diffusion.update(sample_steps=100, cfg_interval=(0.0, 1.0))
    c.train.update(steps=6000, batch_size=2, log_every=100, checkpoint_every=1000,
                   sample_every=2000, eval_every=2000)
    c.optimizer.update(warmup_steps=20)
    return c


README_WORKDIR = "/tmp/tfusion_shapes_tiny"  # where the README job writes its run


def shapes_edit_tiny():
    """Image editing (the paper's section 4.4) by fine-tuning a finished shapes_tiny run
    (the README job's workdir, train.init_from) on shapes_edit: documents
    BOS instruction BOI <input> EOI BOI <output> EOI EOS with the input a clean
    condition image, mixed with the shapes pairs the base trained on (data.edit_fraction
    of the records are edits) so that generation and captioning are kept. Scored by
    `launch.evaluate --suite=edit` on held-out scenes and instructions.

    Chosen by measurement (docs/editing.md#measurements, 100 held-out edits):
      * the instruction before the input image (data.edit_instruction_position
        "before_input"): every output patch then sits 18 positions after its input
        patch whatever the instruction's length, so copying the unchanged objects is
        one relative offset for RoPE attention; and after `BOS BOI <image> EOI` the
        training documents continue with a caption, never an instruction. The
        paper's order ("after_input") gave exact 0.04 and captioning exact 0.00 (it
        captioned with instructions), against 0.14 and 0.78 (1500 steps, lr 1e-3);
      * 75% edits / 25% shapes pairs, lr 2e-3, 2000 steps (~14 min): exact 0.68,
        preserved 0.93.
    """
    c = shapes_tiny()
    c.name = "shapes_edit_tiny"
    c.data.update(source="shapes_edit", edit_fraction=0.75, edit_max_shapes=3,
                  edit_instruction_dropout=0.1, edit_instruction_position="before_input",
                  multi_image_fraction=0.0)
    c.train.update(init_from=README_WORKDIR, steps=2000, checkpoint_every=500,
                   sample_every=0, eval_every=500, final_eval_suite="edit")
    c.optimizer.update(learning_rate=2e-3, warmup_steps=50, final_learning_rate=1e-4)
    return c


def digits_tiny():
    """The same tiny model and recipe on scikit-learn's bundled handwritten digits (8x8
    grey, 1797 images, 256 held out; captions "a handwritten digit seven"): patch 2 gives
    16 patches per image, as patch 4 does for 16 px shapes. The digits suite scores it.
    Uniform diffusion times: its scores (docs/diffusion.md) were measured with them,
    before shapes_tiny moved to logit-normal."""
    c = shapes_tiny()
    c.name = "digits_tiny"
    c.diffusion.timestep_sampling = "uniform"
    # Its scores were measured with 100 DDPM steps, CFG at every step; the few-step
    # default of shapes_tiny was chosen on shapes only.
    c.diffusion.update(sample_steps=100, cfg_interval=(0.0, 1.0))
    c.data = data_config()
    c.data.update(source="digits", image_size=8, seq_len=256, max_images_per_row=8,
                  tokenizer_vocab_size=512, eval_examples=256, text_token_share=0.1,
                  image_first_fraction=0.4)
    c.model.update(latent_height=8, latent_width=8, patch_size=2)
    c.train.update(final_eval_suite="digits", sample_prompts=tuple(
        f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five",
                                             "six", "seven", "eight", "nine")))
    return c
