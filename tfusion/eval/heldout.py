"""Held-out text perplexity and the diagnostics that say what the model has learned.

All numbers come from the training loss's own pieces (tfusion.losses and the
configured tfusion.diffusion.NoiseProcess), over the held-out batches:

  * Text: images are given clean (t = 0), the way inference conditions text on an
    image it has read or finished generating; "perplexity" is exactly exp(mean
    next-token NLL over the positions the LM loss trains on).
  * Denoising skill by noise level: at fixed times (fractions of the process's time
    axis, one per bucket) the MSE of the model's x0 estimate, relative to the MSE of
    predicting the held-out data's mean image. 0 = perfect, 1 = learned nothing (the
    best a model can do at pure noise), above 1 = worse than the mean. The x0 estimate
    is clipped like the samplers clip it (pixel latents: [-1, 1]). The same noise is
    used at every time (common random numbers), so the curve is smooth and two
    checkpoints see identical noise.
  * Cross-modal gaps: the images of the batch (with their noise) are rolled over its
    real image slots, so every image sits beside another document's caption.
    image_caption_gap is the relative increase of the x0 error (mean over the buckets)
    of the same images at the same noise, over images that follow a caption in both
    places; caption_image_gap the relative increase of the NLL of text that follows an
    image in its document. 0 = the modalities ignore each other.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import diffusion, losses, sharding
from tfusion.config import image_token_offset
from tfusion.train.params import stream_keys

# Bucket centres as fractions of the time axis: detail (low t) to layout (high t).
DEFAULT_FRACTIONS = tuple((i + 0.5) / 10 for i in range(10))


def roll_permutation(image_mask):
    """Slot permutation [B * M] (flattened over [B, M]): each real slot takes the image
    of the next real slot; padding slots keep theirs. With one real image it is identity."""
    b, m = image_mask.shape
    mask = image_mask.reshape(b * m)
    order = jnp.argsort((~mask).astype(jnp.int32), stable=True)  # real slots first, in order
    n = jnp.sum(mask)
    rank = jnp.arange(b * m)
    src_rank = jnp.where(rank < n, (rank + 1) % jnp.maximum(n, 1), rank)
    return jnp.zeros((b * m,), jnp.int32).at[order].set(order[src_rank])


def permute_slots(x, perm):
    """x [B, M, ...] with slot i taking slot perm[i]'s value."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    return flat[perm].reshape(x.shape)


def text_after_image(segment_ids, image_index):
    """1 where a position's document has an image before it (segments are contiguous)."""
    patch_seg = jnp.where(image_index >= 0, segment_ids, 0)
    last_patch_seg = jax.lax.cummax(patch_seg, axis=1)
    return (last_patch_seg == segment_ids) & (segment_ids > 0) & (image_index < 0)


def image_after_caption(positions, image_start, image_mask):
    """True for real images with more than BOS and BOI before them in their document."""
    start_pos = jnp.take_along_axis(positions, jnp.clip(image_start, 0), axis=1)
    return image_mask & (start_pos > 2)


class HeldoutEvaluator:
    """Jitted sums over one batch; add them over batches, then finish().

    model_fn(params, batch, noisy, model_t) -> (logits, image prediction) defaults to
    the Transfusion forward of `graphdef`; tests pass stand-in denoisers. With `mesh`
    and `table` (the trainer's), the forward is traced inside their activation
    sharding, as the train step is: unconstrained, XLA replicates activations and the
    flash kernel's operands (AOT at 0.16B: 129.5 GiB per device instead of 4.2).
    """

    def __init__(self, graphdef, config, fractions: Optional[Sequence[float]] = None,
                 model_fn: Callable | None = None, out_shardings=None,
                 process: diffusion.NoiseProcess | None = None, mesh=None, table=None):
        """process: the run's noise process (the trainer passes its objective's; built
        from config.diffusion if None)."""
        self.process = process or diffusion.NoiseProcess(config.diffusion)
        self.fractions = tuple(fractions if fractions is not None else DEFAULT_FRACTIONS)
        self.times = self.process.bucket_times(self.fractions)
        self.image_token_offset = image_token_offset(config.model)
        from tfusion.inference.model_sampler import clip_for
        self.clip = clip_for(config)
        if model_fn is None:
            model_fn = lambda params, batch, noisy, t: nnx.merge(graphdef, params)(batch, noisy, t)
        self.model_fn = model_fn
        self.mesh, self.table = mesh, table
        kwargs = {} if out_shardings is None else dict(out_shardings=out_shardings)
        self._pass = jax.jit(self._pass_sums, static_argnames=("clean",), **kwargs)
        self._data = jax.jit(self._data_sums, **kwargs)
        self._perm = jax.jit(roll_permutation)

    @classmethod
    def for_model(cls, model: nnx.Module, config, **kwargs) -> tuple["HeldoutEvaluator", object]:
        graphdef, params = nnx.split(model)
        return cls(graphdef, config, **kwargs), params

    def _pass_sums(self, params, batch, images, noise, times, clean: bool = False):
        """Sums of one forward pass with `images` in the slots at `times` [B, M];
        `clean`: the images as given at model time 0 (how inference reads an image)."""
        # Condition images (tfusion.batch.CONDITION) are read clean in every pass, as in
        # training; `clean` reads all images so.
        draw = self.process.at(images, times, noise, clean=(batch["image_t_max"] < 0) | clean)
        targets = losses.diffusion_targets(batch)
        with sharding.activation_sharding(self.mesh, self.table or {}):
            logits, pred = self.model_fn(params, batch, draw.noisy, draw.model_t)
        sums = losses.transfusion_sums(logits, pred, draw.target, batch,
                                       image_token_offset=self.image_token_offset)
        x0_hat, _ = self.process.x0_eps(pred, draw.noisy, times)
        if self.clip is not None:
            x0_hat = jnp.clip(x0_hat, -self.clip, self.clip)
        x0_err = jnp.mean(jnp.square(x0_hat - images), axis=(-3, -2, -1))
        conditioned = image_after_caption(batch["positions"], batch["image_start"], targets)
        nll, _ = losses.next_token_nll(logits, batch["tokens"])
        after = losses.lm_target_weights(batch["segment_ids"], batch["image_index"]) \
            * text_after_image(batch["segment_ids"], batch["image_index"])
        return dict(sums, x0_sum=jnp.sum(x0_err * targets), x0_err=x0_err,
                    conditioned=conditioned,
                    after_nll_sum=jnp.sum(nll * after), after_count=jnp.sum(after))

    @staticmethod
    def _data_sums(batch):
        """Sums for the data-mean predictor: sum of images, of their mean squares, count."""
        real = losses.diffusion_targets(batch).astype(jnp.float32)
        return dict(sum_x=jnp.einsum("bm,bm...->...", real, batch["images"]),
                    sum_sq=jnp.sum(jnp.mean(jnp.square(batch["images"]), axis=(-3, -2, -1))
                                   * real),
                    count=jnp.sum(real))

    def batch_sums(self, params, batch: dict, rng: jax.Array) -> dict:
        """{"text", "text_shuffled", "b<k>", "b<k>_shuffled": pass sums, "data": ...}.

        One compiled forward serves every pass (times and images are arguments). The
        shuffled passes move each image together with its noise, and the image gap
        compares the same (image, noise) pairs, only over images that follow a caption
        both in their own slot and in the slot they were moved to; so a model that
        ignores captions has a gap of exactly 0."""
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        noise = jax.random.normal(rng, batch["images"].shape, jnp.float32)
        mask = batch["image_mask"]
        perm = self._perm(mask)
        shuffled, noise_shuffled = permute_slots(batch["images"], perm), permute_slots(noise, perm)
        out = {}
        for name, times in [("text", None)] + [(f"b{k}", k) for k in range(len(self.fractions))]:
            value = jnp.zeros((), self.times.dtype) if times is None else self.times[times]
            t = jnp.full(mask.shape, value, self.times.dtype)
            clean = times is None
            out[name] = self._pass(params, batch, batch["images"], noise, t, clean=clean)
            out[name + "_shuffled"] = self._pass(params, batch, shuffled, noise_shuffled, t,
                                                 clean=clean)
        out["data"] = self._data(batch)
        out = jax.device_get(out)
        perm = np.asarray(jax.device_get(perm))
        for name in list(out):
            if name.endswith("_shuffled"):
                true, moved = out[name[:-len("_shuffled")]], out[name]
                cond = np.asarray(true["conditioned"]).reshape(-1)
                pair = cond & cond[perm]  # conditioned where it was and where it went
                moved["x0_pair_sum"] = float(np.sum(np.asarray(moved["x0_err"]).reshape(-1)[pair]))
                moved["x0_pair_true_sum"] = float(
                    np.sum(np.asarray(true["x0_err"]).reshape(-1)[perm][pair]))
                moved["pair_count"] = float(pair.sum())
        for sums in out.values():
            sums.pop("x0_err", None)
            sums.pop("conditioned", None)
        return out

    def evaluate(self, params, batches: Iterable[dict], seed: int = 0, progress=None) -> dict:
        """Metrics over all batches (see finish()); progress wraps the iterable (tqdm)."""
        key = stream_keys(seed)["eval"]  # the trainer's held-out noise for the same seed
        total = None
        iterable = progress(batches) if progress else batches
        for i, batch in enumerate(iterable):
            sums = self.batch_sums(params, batch, jax.random.fold_in(key, i))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        if total is None:
            raise ValueError("no held-out batches")
        return self.finish(total)

    def finish(self, total: dict) -> dict:
        div = lambda a, b: float(a) / float(b) if float(b) else float("nan")
        text = total["text"]
        # Text pairs only (for the discrete baseline: image codes excluded), no z-loss.
        count = float(text["text_count"])
        nll = div(text["text_nll_sum"], count)
        out = {"text_nll": nll, "perplexity": math.exp(nll) if count else float("nan"),
               "text_targets": int(count), "images": int(text["ddpm_count"])}
        data = total["data"]
        n = float(data["count"])
        mean_image = np.asarray(data["sum_x"]) / max(n, 1.0)
        mean_predictor_mse = div(data["sum_sq"], n) - float(np.mean(np.square(mean_image)))
        out["mean_predictor_x0_mse"] = mean_predictor_mse
        log_snr = self.process.log_snr(self.times)
        skill, loss, cond_true, cond_shuffled = [], [], [], []
        for k, f in enumerate(self.fractions):
            b, bs = total[f"b{k}"], total[f"b{k}_shuffled"]
            name = f"f{f:.2f}"
            out[f"diffusion_loss/{name}"] = div(b["ddpm_sum"], b["ddpm_count"])
            out[f"x0_mse/{name}"] = div(b["x0_sum"], b["ddpm_count"])
            out[f"denoise_skill/{name}"] = out[f"x0_mse/{name}"] / mean_predictor_mse \
                if mean_predictor_mse > 0 else float("nan")
            out[f"log_snr/{name}"] = float(log_snr[k])
            skill.append(out[f"denoise_skill/{name}"])
            loss.append(out[f"diffusion_loss/{name}"])
            cond_true.append(div(bs["x0_pair_true_sum"], bs["pair_count"]))
            cond_shuffled.append(div(bs["x0_pair_sum"], bs["pair_count"]))
        out["denoise_skill_mean"] = float(np.mean(skill)) if skill else float("nan")
        out["diffusion_loss_mean"] = float(np.mean(loss)) if loss else float("nan")
        # Cross-modal gaps (relative; 0 = the other modality is ignored).
        out["image_x0_mse_true_caption"] = float(np.mean(cond_true)) if skill else float("nan")
        out["image_x0_mse_shuffled_caption"] = float(np.mean(cond_shuffled)) if skill \
            else float("nan")
        out["image_caption_gap"] = (out["image_x0_mse_shuffled_caption"]
                                    / out["image_x0_mse_true_caption"] - 1.0)
        out["caption_nll_true_image"] = div(text["after_nll_sum"], text["after_count"])
        out["caption_nll_shuffled_image"] = div(total["text_shuffled"]["after_nll_sum"],
                                                total["text_shuffled"]["after_count"])
        out["caption_image_gap"] = (out["caption_nll_shuffled_image"]
                                    / out["caption_nll_true_image"] - 1.0)
        return out


def heldout_metrics(model: nnx.Module, batches: Iterable[dict], config,
                    fractions: Optional[Sequence[float]] = None, seed: int = 0,
                    progress=None) -> dict:
    """Perplexity, denoising skill by noise level and the cross-modal gaps over
    held-out batches (HeldoutEvaluator.finish lists the keys). The passes run where
    the model's params lie (sharded on their mesh: every process of a multi-process
    run calls this with the same batches); the sums come back replicated, readable by
    every process."""
    from tfusion.inference.model_sampler import params_mesh

    mesh = params_mesh(model)
    out_shardings = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    evaluator, params = HeldoutEvaluator.for_model(model, config, fractions=fractions,
                                                   out_shardings=out_shardings)
    return evaluator.evaluate(params, batches, seed, progress)
