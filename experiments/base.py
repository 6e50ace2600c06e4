"""The full experiment config: model, diffusion, loss, data, optimizer, train, mesh.

Every experiment starts from `base_config()` and changes fields; every field is
documented where it is set (model/diffusion/loss in tfusion/config.py, data in
data_pipelines/config.py, the rest here).
"""
from __future__ import annotations

import ml_collections

from data_pipelines.config import data_config
from tfusion.config import diffusion_config, loss_config, model_config


def optimizer_config() -> ml_collections.ConfigDict:
    """AdamW with the paper's values (Transfusion, Section 4.1)."""
    c = ml_collections.ConfigDict()
    c.learning_rate = 3e-4  # peak
    c.warmup_steps = 4000  # linear warmup from 0
    c.final_learning_rate = 1.5e-5  # cosine decay ends here at train.steps
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1  # decoupled; not applied to norms and biases
    c.grad_clip = 1.0  # global-norm clipping
    return c


def train_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.steps = 250_000  # optimizer steps
    c.batch_size = 512  # global rows per step (512 x 4096 = 2M tokens, the paper's)
    c.grad_accum_steps = 1  # microbatches per step (batch_size must divide evenly)
    c.seed = 0  # params, data order and diffusion noise all derive from it
    # EMA of the params (0 = off; the paper is silent). With it, train.sample_every,
    # launch.generate and launch.evaluate use the EMA (--params=raw for the raw ones).
    # Warm-up: the decay at step n is min(ema_decay, (1 + n) / (10 + n)).
    c.ema_decay = 0.0
    c.log_every = 50  # steps between metrics.jsonl / TensorBoard / console lines
    c.checkpoint_every = 1000  # steps between (async) checkpoints
    c.keep_checkpoints = 3  # newest N checkpoints kept
    # After SIGTERM the run saves at the next step boundary (or at once while it waits
    # for data) and stops. If it is still alive this many seconds after the signal
    # (a stalled pipeline or evaluation), it logs what it waited on and exits with 143,
    # before the cluster's SIGKILL. Keep it under the grace period (SLURM KillWait,
    # Kubernetes and GCE preemption default to 30 s). 0 = no deadline.
    c.preemption_timeout_s = 25.0
    # Multi-process runs agree on a SIGTERM seen by any process every this many steps
    # (an allgather each time; single-process runs look at every step for free).
    c.preemption_sync_every = 10
    c.eval_every = 0  # steps between held-out evaluations; 0 = never during training
    c.sample_every = 0  # steps between sample grids in workdir/samples/; 0 = never
    # Eval suite (tfusion/eval/suites.py: text, shapes, fid, all) run once when training
    # ends, on the sampling params; its scores are printed and logged. "" = none.
    c.final_eval_suite = ""
    # (first, last): a jax.profiler trace of train steps first..last (1-based, as in
    # metrics.jsonl) written to workdir/profile/ (TensorBoard's profile plugin,
    # Perfetto); () = none. Skip the first steps: they include compilation.
    c.profile_steps = ()
    # Warm start (tfusion/train/warm_start.py): a run directory (or launch.export orbax
    # directory) whose params, matched by name and shape, replace the fresh ones at the
    # first start; "" = from scratch. init_from_params: its "ema" (where kept) or "raw".
    c.init_from = ""
    c.init_from_params = "ema"
    # Param groups that get no updates and no optimizer state
    # (tfusion/train/optimizer.py PARAM_GROUPS: text, embeddings, backbone, image).
    c.freeze = ()
    c.sample_prompts = ("a red circle", "a large blue square at the center",
                        "a small green triangle at the top left and a yellow circle")
    # Non-finite loss/grads: the update is skipped and counted; after this many in a
    # row the run stops (last good checkpoint kept).
    c.max_nonfinite_steps = 5
    # Peak FLOP/s per device for MFU; 0 = look up the device kind (tfusion/train/mfu.py).
    c.peak_flops_per_device = 0.0
    return c


def mesh_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.data = -1  # pure data parallel; -1 = whatever devices remain
    c.fsdp = 1  # data parallel with params/optimizer state sharded (ZeRO-3 style)
    c.tensor = 1  # heads / mlp / vocab split (Megatron style)
    # Logical axis -> mesh axes overrides of tfusion/sharding.py's table, e.g.
    # {"activation_length": "tensor"} for sequence parallelism.
    c.rule_overrides = ml_collections.ConfigDict()
    # Logical axes (tfusion/sharding.py) allowed to be replicated over a mesh axis that
    # does not divide them. Anything else that does not divide is an error at start-up
    # naming the parameter (or activation), so nothing is silently replicated at scale.
    c.allow_replicated = ()
    return c


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.description = ""
    c.model = model_config()
    c.diffusion = diffusion_config()
    c.loss = loss_config()
    c.data = data_config()
    c.optimizer = optimizer_config()
    c.train = train_config()
    c.mesh = mesh_config()
    return c
