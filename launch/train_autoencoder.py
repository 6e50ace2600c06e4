"""Train a VAE or VQ-VAE on a configured image source; logs reconstruction PSNR.

  python -m launch.train_autoencoder --config=experiments/registry.py:vae_shapes_tiny \\
      --workdir=/tmp/vae [--config.train.steps=200 ...]

Writes workdir/metrics.jsonl (one line per logged step), workdir/eval.json (held-out
PSNR, codebook use) and workdir/autoencoder/ in diffusers format (config.json +
safetensors), which `data.encoder_path` and launch/encode_latents.py load. A small
dedicated loop (no checkpoint/resume): autoencoders train in minutes at our scale.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/registry.py:vae_shapes_tiny",
    "Experiment with an `autoencoder` section: experiments/registry.py:NAME.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def pixel_batches(data, split: str, batch_size: int, seed: int, repeat: bool):
    """Batches of float32 [B, px, px, 3] images in [-1, 1] from data.source."""
    import numpy as np

    from data_pipelines import sources
    from data_pipelines.images import prepare_image

    records = sources.image_source(data, split)
    if repeat:
        records = records.shuffle(seed=seed).repeat()
    pixels = records.map(lambda r: prepare_image(r.image, data.image_size)[0])
    return iter(pixels.batch(batch_size, drop_remainder=True, batch_fn=np.stack))


def build_model(config):
    from flax import nnx

    from tfusion.autoencoders import AutoencoderKL, VQModel
    from tfusion.autoencoders.train_config import architecture

    cls = AutoencoderKL if config.autoencoder.kind == "vae" else VQModel
    return cls(architecture(config.autoencoder), rngs=nnx.Rngs(config.train.seed))


def evaluate(model, config) -> dict:
    """Held-out PSNR (posterior mean / nearest codes), latent std, codebook use."""
    import jax.numpy as jnp
    import numpy as np

    from tfusion.autoencoders import AutoencoderKL, jit_method, losses
    from tfusion.autoencoders.vq import codebook_usage

    a = config.autoencoder
    batch = min(a.eval_images, 16)
    batches = pixel_batches(config.data, "eval", batch, 0, repeat=False)
    is_vae = isinstance(model, AutoencoderKL)
    encode = jit_method(model, "posterior" if is_vae else "encode_ids")
    decode = jit_method(model, "decode_z" if is_vae else "decode_ids")
    psnrs, latents, ids = [], [], []
    for _, images in zip(range(max(1, a.eval_images // batch)), batches):
        code = encode(jnp.asarray(images))
        code = code.mean if is_vae else code
        (latents if is_vae else ids).append(np.asarray(code))
        psnrs.append(float(losses.psnr(decode(code), jnp.asarray(images))))
    out = {"eval_psnr": float(np.mean(psnrs)), "eval_images": len(psnrs) * batch}
    if is_vae:
        z = np.concatenate(latents)
        out.update(latent_mean=float(z.mean()), latent_std=float(z.std()))
    else:
        usage = codebook_usage(jnp.asarray(np.concatenate(ids)), a.num_vq_embeddings)
        out.update({k: float(v) for k, v in usage.items()})
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import dataclasses

    import jax
    from flax import nnx

    from tfusion.autoencoders import diffusers_weights
    from tfusion.autoencoders.train_config import WEIGHTS_DIR, loss_config, validate
    from tfusion.autoencoders.training import AutoencoderTrainer

    config, workdir = _CONFIG.value, _WORKDIR.value
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    a, train = config.autoencoder, config.train
    batches = pixel_batches(config.data, "train", train.batch_size, train.seed, repeat=True)
    model = build_model(config)
    if a.kind == "vq":  # data-dependent codebook init (see VQModel.init_codebook_from)
        nnx.jit(type(model).init_codebook_from)(model, next(batches),
                                                jax.random.key(train.seed))
    trainer = AutoencoderTrainer(model, loss_config(a), a.learning_rate,
                                 seed=train.seed, discriminator_channels=a.discriminator_channels)
    start = time.time()
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as log:
        for step in range(1, train.steps + 1):
            metrics = trainer.step(next(batches), step)
            if step % train.log_every == 0 or step == train.steps:
                elapsed = time.time() - start
                line = {"step": step, **metrics, "images_per_s": step * train.batch_size / elapsed}
                log.write(json.dumps(line) + "\n")
                log.flush()
                print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in line.items()), flush=True)
    model = trainer.model()
    results = evaluate(model, config)
    results["train_seconds"] = time.time() - start
    if a.kind == "vae" and not a.scaling_factor:
        # Unit-variance latents for the diffusion model (LDM): scale = 1 / std(z - shift).
        scale = 1.0 / max(results["latent_std"], 1e-6)
        model.cfg = dataclasses.replace(model.cfg, scaling_factor=scale)
        results["scaling_factor"] = scale
    diffusers_weights.save_pretrained(model, os.path.join(workdir, WEIGHTS_DIR))
    with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    app.run(main)
