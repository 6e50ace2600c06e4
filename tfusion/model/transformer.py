"""The decoder stack: `depth` blocks whose parameters are stacked on a `layers` axis.

Parameters are always stacked, so a checkpoint does not depend on how the stack
runs: `scan_layers=True` runs it with lax.scan (compile time independent of depth),
False unrolls a Python loop over layer slices (faster steps on some backends).
Each block is rematerialised by the policy named in config.model.remat_policy.
"""
from __future__ import annotations

import jax
from flax import nnx

from tfusion.model.block import Block, BlockContext

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": jax.checkpoint_policies.save_only_these_names("attention_out"),
}


class Transformer(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.depth = cfg.depth
        self.scan_layers = cfg.scan_layers
        self.remat_policy = cfg.remat_policy

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = stacked(rngs)
        for _, var in nnx.iter_graph(self.blocks):
            if isinstance(var, nnx.Param):
                var.set_metadata("logical_axes", ("layers",) + var.get_metadata()["logical_axes"])

    def __call__(self, x: jax.Array, ctx: BlockContext, cache=None):
        """x [B, L, D] -> ([B, L, D], updated cache or None).

        `cache`, when given, is {"k", "v"} stacked over layers: [depth, B, S, Hkv, Dh].
        """
        graphdef, params = nnx.split(self.blocks)

        def layer(x, layer_params, layer_cache):
            block = nnx.merge(graphdef, layer_params)
            return block(x, ctx, layer_cache)

        policy = REMAT_POLICIES[self.remat_policy]
        if self.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=not self.scan_layers)

        if self.scan_layers:
            def body(x, xs):
                layer_params, layer_cache = xs
                return layer(x, layer_params, layer_cache)

            return jax.lax.scan(body, x, (params, cache))
        new_cache = []
        for i in range(self.depth):
            sl = jax.tree.map(lambda a: a[i], (params, cache))
            x, c = layer(x, *sl)
            new_cache.append(c)
        if cache is None:
            return x, None
        return x, jax.tree.map(lambda *a: jax.numpy.stack(a), *new_cache)
