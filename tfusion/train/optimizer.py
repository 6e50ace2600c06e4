"""AdamW with the paper's recipe: linear warmup, cosine decay, masked weight decay, clipping.

Weight decay applies to every matrix, embeddings included (the Llama recipe the paper
follows decays all weights; leaving the embedding undecayed made no difference in
our tiny runs, and decaying it keeps one simple rule). Norm scales and biases are
never decayed: shrinking them towards 0 has no regularising meaning.
"""
from __future__ import annotations

import jax
import optax

# Leaf names (last path key) that are excluded from weight decay.
NO_DECAY_NAMES = ("scale", "bias")

# train.freeze: param groups, each a test of a param's key path. A name with an
# "image_" part is image-side: the image encoder and decoder and, with untied modality
# weights (model.modality_weights), the backbone's image twins and image_final_norm.
# "text" is every weight the text path uses: the embeddings, the LM head and the
# backbone (with shared weights, all of it: the image path shares it too; untied, its
# text side); "image" the image side.
def _is_image_side(path: tuple) -> bool:
    return any(str(k).startswith("image_") for k in path)


PARAM_GROUPS = {
    "text": lambda path: not _is_image_side(path),
    "embeddings": lambda path: path[0] in ("embed", "lm_head"),
    "backbone": lambda path: path[0] in ("backbone", "final_norm", "image_final_norm"),
    "image": _is_image_side,
}


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """0 -> learning_rate over warmup_steps, then cosine to final_learning_rate at total_steps."""
    warmup = min(int(opt_cfg.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.final_learning_rate)


def _last_key(path) -> str:
    key = path[-1]
    return str(getattr(key, "key", getattr(key, "name", key)))


def decay_mask(params):
    """True where weight decay applies (see module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _last_key(path) not in NO_DECAY_NAMES, params)


def frozen_mask(params, freeze) -> dict:
    """True at every param in one of the `freeze` groups (PARAM_GROUPS)."""
    def frozen(path, _):
        keys = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        return any(PARAM_GROUPS[group](keys) for group in freeze)

    return jax.tree_util.tree_map_with_path(frozen, params)


def make_optimizer(opt_cfg, freeze=()) -> optax.GradientTransformation:
    """AdamW at unit learning rate; the train step multiplies its updates by
    learning_rate_schedule(step).

    Why not give optax the schedule: optax counts *applied* updates, and skipped
    (non-finite) steps would then shift the schedule against the data. With the
    state's step driving it, lr is a pure function of the step (logged exactly),
    and adamw's decoupled decay is still scaled by lr as in optax.adamw.
    Clipping acts on the raw global-batch gradient, before Adam's moments;
    grad_clip <= 0 turns it off.

    freeze (train.freeze, PARAM_GROUPS names): those params get zero updates and no
    optimizer state (optax.multi_transform with set_to_zero; the clip norm is that of
    the trained params' gradient). The train step adds lr * 0 to them, which leaves
    them bit-identical, and the EMA of an unchanged param is that param.
    """
    adamw = optax.adamw(learning_rate=1.0, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                        weight_decay=opt_cfg.weight_decay, mask=decay_mask)
    trained = (adamw if opt_cfg.grad_clip <= 0
               else optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), adamw))
    if not freeze:
        return trained
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained",
                                         frozen_mask(params, tuple(freeze)))
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, labels)
