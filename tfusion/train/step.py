"""One train step, read top to bottom: the objective (Transfusion's loss as a pure
function of the params), gradient accumulation, the optimizer and EMA update with
non-finite skipping, and the held-out eval step that calls the same objective.

Diffusion t and noise are drawn once for the whole global batch from the step key,
then microbatches are cut from batch and noise together, so the accumulated step
equals the big-batch step (same noise, same normalisation), whatever the split.
Each microbatch loss is normalised by the *global* counts (combine() with the
global counts substituted), so summing microbatch gradients gives exactly the
gradient of the global-batch loss.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax import nnx

from tfusion import diffusion, losses, sharding
from tfusion.batch import capacity_per_unit
from tfusion.config import LossConfig, image_token_offset
from tfusion.model.transfusion import ImageCapacity
from tfusion.train.state import step_key

class Objective:
    """Binds the static parts (graphdef, noise process, weights) of the Transfusion loss."""

    def __init__(self, graphdef: nnx.GraphDef, config,
                 process: diffusion.NoiseProcess | None = None, image_groups: int = 1):
        """process: the run's noise process (built from config.diffusion if None); the
        trainer builds it once and shares it with held-out evaluation. image_groups: the
        batch shards (mesh data x fsdp), the row groups of data.image_capacity_per_row."""
        self.graphdef = graphdef
        self.image_groups = image_groups
        # Images per group of one device's rows of one microbatch (the unit the input
        # pipeline packs to); 0 = the modality layers run on every slot.
        self.images_per_unit = image_capacity_per_unit(config, image_groups)
        self.unit_rows = (config.train.batch_size // (image_groups * config.train.grad_accum_steps)
                          if self.images_per_unit else 0)
        self.process = process or diffusion.NoiseProcess(config.diffusion)
        self.diffusion_weight = float(config.diffusion.loss_weight)
        # A config without a loss section (data-only examples) gets LossConfig's defaults.
        loss_cfg = LossConfig.of(config.loss) if "loss" in config else LossConfig()
        self.z_loss_weight = float(loss_cfg.z_loss_weight)
        self.image_token_offset = image_token_offset(config.model)

    def draw_noise(self, batch: dict, rng: jax.Array) -> diffusion.NoiseDraw:
        """Time, noise, noisy latents and targets for every image slot of the batch."""
        return self.process.draw(rng, batch["images"], batch["image_t_max"])

    def capacity(self, rows: int) -> ImageCapacity | None:
        """The modality layers' capacity for a forward over `rows` rows: each of the
        image_groups groups holds rows / image_groups rows, i.e. a whole number of
        pipeline units of `unit_rows` rows with at most images_per_unit images each."""
        if not self.images_per_unit:
            return None
        units, rest = divmod(rows // self.image_groups, self.unit_rows)
        if rest or rows % self.image_groups:
            raise ValueError(f"{rows} rows are not {self.image_groups} groups of whole "
                             f"{self.unit_rows}-row units of data.image_capacity_per_row")
        return ImageCapacity(self.image_groups, units * self.images_per_unit)

    def sums_given_noise(self, params, batch: dict, draw: diffusion.NoiseDraw) -> dict:
        """Loss sums and counts with the noise fixed (gradient accumulation draws it once
        for the global batch, then cuts microbatches)."""
        model = nnx.merge(self.graphdef, params)
        logits, image_pred = model(batch, draw.noisy, draw.model_t,
                                   self.capacity(batch["tokens"].shape[0]))
        return losses.transfusion_sums(logits, image_pred, draw.target, batch,
                                       self.z_loss_weight, self.image_token_offset,
                                       draw.weight)

    def sums(self, params, batch: dict, rng: jax.Array) -> dict:
        """Loss sums and counts of one batch; t and noise are drawn here."""
        return self.sums_given_noise(params, batch, self.draw_noise(batch, rng))

    def loss(self, params, batch: dict, rng: jax.Array):
        """(scalar loss, aux) for jax.value_and_grad(has_aux=True)."""
        sums = self.sums(params, batch, rng)
        values = losses.combine(sums, self.diffusion_weight)
        return values["loss"], dict(sums=sums, **values)


def image_capacity_per_unit(config, image_groups: int) -> int:
    """Images the input pipeline packs at most into each unit (one device's rows of one
    microbatch); 0 when data.image_capacity_per_row is off."""
    per_row = float(config.get("data", {}).get("image_capacity_per_row", 0.0) or 0.0)
    if not per_row:
        return 0
    t = config.train
    return capacity_per_unit(per_row, t.batch_size // (image_groups * t.grad_accum_steps))


def batch_shardings(mesh: Mesh, table: Mapping[str, Any], batch_ndims: Mapping[str, int]):
    return {k: sharding.batch_sharding(mesh, table, batch_ndims[k]) for k in batch_ndims}


def global_counts(batch: dict) -> dict:
    """Denominators of the global-batch loss; they do not depend on the params."""
    weights = losses.lm_target_weights(batch["segment_ids"], batch["image_index"])
    return dict(lm_count=jnp.sum(weights),
                ddpm_count=jnp.sum(losses.diffusion_targets(batch).astype(jnp.float32)))


def split_microbatches(tree, num: int, mesh: Mesh | None, table):
    """[B, ...] -> [num, B/num, ...] taking rows num apart, so every device keeps its
    own rows in every microbatch (no resharding when the batch is sharded by rows)."""

    def one(x):
        x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
        if mesh is None:
            return x
        spec = sharding.logical_to_spec((None, "activation_batch") + (None,) * (x.ndim - 2),
                                        table)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


def loss_and_grads(objective: Objective, params, batch: dict, rng, accum: int,
                   mesh: Mesh | None, table):
    """(global sums, grads of the global-batch loss) with `accum` scanned microbatches."""
    draw = objective.draw_noise(batch, rng)
    counts = global_counts(batch)

    def micro_loss(p, micro):
        sums = objective.sums_given_noise(p, *micro)
        scaled = losses.combine(dict(sums, **counts), objective.diffusion_weight)
        return scaled["loss"], sums

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if accum == 1:
        (_, sums), grads = grad_fn(params, (batch, draw))
        return sums, grads

    def body(carry, micro):
        sums_acc, grads_acc = carry
        (_, sums), grads = grad_fn(params, micro)
        return (jax.tree.map(jnp.add, sums_acc, sums), jax.tree.map(jnp.add, grads_acc, grads)), None

    micros = split_microbatches((batch, draw), accum, mesh, table)
    zero_sums = jax.tree.map(jnp.zeros_like, jax.eval_shape(
        lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micros))[0][1]))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    (sums, grads), _ = jax.lax.scan(body, (zero_sums, zero_grads), micros)
    return sums, grads


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def ema_decay_at(step, decay: float):
    """The decay used for the update after `step` optimizer steps: min(decay,
    (1 + n) / (10 + n)) (the usual warm-up, TF's num_updates rule), so the average
    forgets the random initialisation within the first hundred steps."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema, params, decay):
    """ema <- decay ema + (1 - decay) params, leaf by leaf in float32 (sharded like params),
    written as ema + (1 - decay)(params - ema): an average equal to its param (a frozen
    one, train.freeze) stays bit-identical to it."""
    return jax.tree.map(lambda e, p: (e + (1.0 - decay) * (p - e)).astype(e.dtype), ema, params)


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule,
                    accum: int, mesh: Mesh | None = None, table: Mapping[str, Any] | None = None,
                    ema_decay: float = 0.0):
    """Pure (state, batch) -> (state, metrics); jit it with `jit_train_step`.

    A non-finite loss or gradient leaves params, optimizer state and the EMA
    untouched (the step and the non-finite counters still advance), decided on device.
    With ema_decay > 0 the state carries ema_params, updated after every good step.
    """

    def train_step(state: dict, batch: dict):
        with sharding.activation_sharding(mesh, table or {}):
            rng = step_key(state["rng"], state["step"])
            sums, grads = loss_and_grads(objective, state["params"], batch, rng, accum,
                                         mesh, table)
        values = losses.combine(sums, objective.diffusion_weight)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(values["loss"]) & jnp.isfinite(grad_norm)
        lr = schedule(state["step"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        updates = jax.tree.map(lambda u: lr * u, updates)
        params = optax.apply_updates(state["params"], updates)
        run = jnp.where(ok, 0, state["nonfinite_run"] + 1)
        new_state = dict(state, step=state["step"] + 1,
                         params=_select(ok, params, state["params"]),
                         opt_state=_select(ok, opt_state, state["opt_state"]),
                         nonfinite_run=run,
                         nonfinite_total=state["nonfinite_total"] + (~ok).astype(jnp.int32))
        if ema_decay > 0:
            ema = ema_update(state["ema_params"], params, ema_decay_at(state["step"], ema_decay))
            new_state["ema_params"] = _select(ok, ema, state["ema_params"])
        metrics = dict(values, grad_norm=grad_norm, lr=lr, text_tokens=sums["text_tokens"],
                       patch_tokens=sums["patch_tokens"], skipped=(~ok).astype(jnp.int32),
                       nonfinite_run=run, nonfinite_total=new_state["nonfinite_total"])
        return new_state, metrics

    return train_step


def jit_train_step(train_step, mesh: Mesh, table, state_sh: dict, batch_ndims: Mapping[str, int]):
    """Explicit in/out shardings; the state is donated (updated in place)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(train_step,
                   in_shardings=(state_sh, batch_shardings(mesh, table, batch_ndims)),
                   out_shardings=(state_sh, replicated),  # every metric: a replicated scalar
                   donate_argnums=0)


def make_eval_step(objective: Objective, mesh: Mesh, table, param_sh,
                   batch_ndims: Mapping[str, int]):
    """jit(params, batch, rng) -> loss sums of one held-out batch (add, then combine)."""

    def eval_sums(params, batch, rng):
        with sharding.activation_sharding(mesh, table):
            return objective.sums(params, batch, rng)

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_sums,
                   in_shardings=(param_sh, batch_shardings(mesh, table, batch_ndims),
                                 replicated),
                   out_shardings=replicated)
