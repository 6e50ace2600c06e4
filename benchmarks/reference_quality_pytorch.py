"""The PyTorch peer's side of the quality-per-CPU-minute benchmark, and its image timing.

Two modes, each run as a subprocess of a jax-free interpreter (torch and jax never
share a process), each printing one JSON object on its last stdout line:

    # train lucidrains' transfusion-pytorch on `shapes` for the spec's budgets, then
    # sample the spec's held-out prompts from each EMA snapshot (run by
    # benchmarks/quality_vs_reference.py, which writes the spec and scores the images):
    python benchmarks/reference_quality_pytorch.py --spec DIR/peer_spec.json --out DIR/peer

    # seconds of one 250-step CFG image at the inference benchmark's shape (run by
    # benchmarks/inference.py):
    python benchmarks/reference_quality_pytorch.py --image-seconds --shape cpu-s

Training follows the library's own example (train_mnist.py upstream) and defaults
unless the spec's `peer` settings (written by the driver, which holds the defaults
and the --peer-* options) say otherwise: Adam(lr 3e-4), grad-norm clip 0.5, 16
caption -> image samples per step, `model.create_ema()` (beta 0.99, ema_pytorch's
warm-up, updated every 10 steps; beta 0 samples the raw weights), flow matching (its
only image objective; prob_uncond 0.1 for CFG; flow_loss_weight 1 against its text
loss on the caption). Images are the
spec's 16x16x3 pixels in [-1, 1] as 4x4 grids of 48-dim patches (channel last),
with `add_pos_emb=True, modality_num_dim=2`. Sampling: `sample_many` with
`force_modality_at_start=(0, (4, 4))` after the prompt's caption ids, its defaults
otherwise (16 ODE time points, midpoint solver: 15 steps = 30 model evaluations,
cfg_scale 3), from the EMA model.

With the spec's `conditioning_check`, the last snapshot is also sampled with the same
noise (same torch seed, so each prompt index draws the same noise) for: every caption
swapped with the next prompt's (`images_swap`), the caption's ids replaced by the
library's null-text id at CFG 1 (its unconditional branch, `images_uncond`), the
captions at CFG 1 (`images_cfg1`), and the captions with the next seed's noise
(`images_reseed`); the driver compares and scores them.

Training time counts every step (data rendering, forward, backward, optimizer, EMA
update) and nothing else: EMA snapshots are copied off the clock at the first step
whose cumulative time reaches each budget, and sampled after training.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

NUM_THREADS = 2  # the benchmark machine's cores; tfusion's XLA uses all of them too
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# Steps on the library's 'auto' batch-processing router before its choice is pinned
# (it re-times its strategies for every new batch structure; caption lengths vary).
ROUTER_WARMUP_STEPS = 20


def load_shapes_module():
    """data_pipelines/shapes.py, the scene generator tfusion trains on, loaded by path:
    it needs only numpy, but importing it through its package would pull in jax."""
    spec = importlib.util.spec_from_file_location(
        "tfusion_shapes", os.path.join(_ROOT, "data_pipelines", "shapes.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def to_patch_grid(image: np.ndarray, patch: int) -> torch.Tensor:
    """[H, W, C] pixels -> [H/p, W/p, p*p*C] patches, channel last (the peer's latent)."""
    h, w, c = image.shape
    grid = image.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
    return torch.from_numpy(np.ascontiguousarray(grid.reshape(h // patch, w // patch, -1)))


def from_patch_grid(latent: np.ndarray, patch: int) -> np.ndarray:
    """The inverse of to_patch_grid."""
    gh, gw, d = latent.shape
    c = d // (patch * patch)
    pixels = latent.reshape(gh, gw, patch, patch, c).transpose(0, 2, 1, 3, 4)
    return pixels.reshape(gh * patch, gw * patch, c)


class PairStream:
    """Caption ids -> image samples drawn from tfusion's shapes training split: scene
    index i of the train seed, rendered by the same code, in a seeded random order
    (tfusion shuffles the same index range with its own seed), captions tokenized by
    tfusion's tokenizer model."""

    def __init__(self, spec: dict):
        import sentencepiece as spm

        self.shapes = load_shapes_module()
        with open(spec["tokenizer_model"], "rb") as f:
            self.tokenizer = spm.SentencePieceProcessor(model_proto=f.read())
        self.seed, self.max_shapes = spec["train_seed"], spec["max_shapes"]
        self.px, self.patch = spec["image_size"], spec["patch_size"]
        self.order = np.random.default_rng(spec["order_seed"]).permutation(spec["num_examples"])
        self.position = 0

    def encode(self, caption: str) -> list[int]:
        return self.tokenizer.encode(caption)  # what tfusion's Tokenizer.encode does

    def batch(self, size: int) -> list[list[torch.Tensor]]:
        samples = []
        for _ in range(size):
            index = int(self.order[self.position % len(self.order)])
            self.position += 1
            scene = self.shapes.make_scene(self.seed, index, self.max_shapes)
            pixels = self.shapes.render_scene(scene, self.px).astype(np.float32) / 127.5 - 1.0
            samples.append([torch.tensor(self.encode(scene.caption())),
                            to_patch_grid(pixels, self.patch)])
        return samples


def build_model(spec: dict):
    from transfusion_pytorch import Transfusion

    peer = spec["peer"]
    grid = spec["image_size"] // spec["patch_size"]
    # Its FeedForward is GEGLU with inner size int(dim * factor * 2 / 3): this factor
    # gives tfusion's SwiGLU hidden size exactly.
    ff_factor = spec["mlp_hidden"] * 3 / (2 * spec["width"])
    return Transfusion(
        num_text_tokens=spec["num_text_tokens"],
        dim_latent=spec["patch_size"] ** 2 * 3,
        modality_default_shape=(grid, grid), modality_num_dim=2, add_pos_emb=True,
        flow_loss_weight=peer["flow_loss_weight"], prob_uncond=peer["prob_uncond"],
        odeint_kwargs=dict(atol=1e-5, rtol=1e-5, method=peer["ode_method"]),
        transformer=dict(dim=spec["width"], depth=spec["depth"], heads=spec["heads"],
                         dim_head=spec["head_dim"], ff_expansion_factor=ff_factor))


def pin_processing_strategy(model) -> str:
    """Fixes the batch-processing strategy the library's 'auto' router has chosen so far,
    so that it stops re-timing its strategies inside training (its best case)."""
    from transfusion_pytorch import modality_processing

    if model.modality_processing == "auto" and modality_processing.ROUTER.cache:
        model.modality_processing = list(modality_processing.ROUTER.cache.values())[-1]
    return model.modality_processing


def train(model, ema, stream: PairStream, budgets_s: list[float], peer: dict) -> list[dict]:
    """Trains until the last budget; returns one EMA snapshot per budget (the raw
    weights when peer["ema_beta"] is 0)."""
    batch_size = peer["batch_size"]
    opt = torch.optim.Adam(model.parameters(), lr=peer["lr"])
    use_ema = peer["ema_beta"] > 0
    model.train()
    pending, snapshots, losses = sorted(budgets_s), [], []
    elapsed, step = 0.0, 0
    while pending:
        start = time.perf_counter()
        loss = model(stream.batch(batch_size))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), peer["grad_clip"])
        opt.step()
        opt.zero_grad()
        if use_ema:
            ema.update()
        losses.append(loss.item())
        step += 1
        if step == ROUTER_WARMUP_STEPS:
            pin_processing_strategy(model)
        elapsed += time.perf_counter() - start
        while pending and elapsed >= pending[0]:
            snapshots.append(dict(budget_s=pending.pop(0), steps=step, train_seconds=elapsed,
                                  pairs_seen=step * batch_size,
                                  loss_last_100=statistics.mean(losses[-100:]),
                                  state=copy.deepcopy((ema.ema_model if use_ema else model)
                                                      .state_dict())))
            print(f"[peer] {elapsed:.0f} s: step {step}, loss {snapshots[-1]['loss_last_100']:.3f}",
                  flush=True)
    return snapshots


def sample_images(ema, state: dict, prompt_ids: list[list[int]], grid: int, patch: int,
                  seed: int, peer: dict, cfg_scale: float | None = None) -> np.ndarray:
    """One image per prompt from the weights `state`: float32 [N, H, W, 3]. The noise of
    prompt i depends only on `seed` and i (the initial noise is the only random draw
    when the modality is forced at the start)."""
    ema.ema_model.load_state_dict(state)
    torch.manual_seed(seed)
    # max_length=1: sampling stops once more than max_length tokens were decoded, so right
    # after the forced image (16 tokens) instead of writing text after it.
    out = ema.sample_many([torch.tensor(ids) for ids in prompt_ids],
                          force_modality_at_start=(0, (grid, grid)), max_length=1,
                          modality_steps=peer["modality_steps"],
                          cfg_scale=peer["cfg_scale"] if cfg_scale is None else cfg_scale,
                          return_without_prompt=True)
    return np.stack([from_patch_grid(sample[0].tensor.numpy(), patch) for sample in out])


def run_quality(spec_path: str, out_dir: str) -> dict:
    with open(spec_path) as f:
        spec = json.load(f)
    torch.manual_seed(spec["seed"])
    stream = PairStream(spec)
    # Both sides must see identical caption ids: the driver tokenized the prompts
    # with tfusion's Tokenizer; this process's encoder must agree.
    mine = [stream.encode(p) for p in spec["prompts"]]
    if mine != spec["prompt_ids"]:
        raise RuntimeError("caption ids differ from tfusion's tokenizer")
    peer = spec["peer"]
    model = build_model(spec)
    ema = model.create_ema(beta=peer["ema_beta"] or 0.99)
    ema.update_every = peer["ema_update_every"]
    snapshots = train(model, ema, stream, [60.0 * m for m in spec["minutes"]], peer)
    os.makedirs(out_dir, exist_ok=True)
    grid, patch = spec["image_size"] // spec["patch_size"], spec["patch_size"]
    ids = spec["prompt_ids"]
    points, check = [], None
    for minutes, snap in zip(sorted(spec["minutes"]), snapshots):
        start = time.perf_counter()
        state = snap.pop("state")
        images = sample_images(ema, state, ids, grid, patch, spec["seed"], peer)
        path = os.path.join(out_dir, f"images_{minutes:g}min.npy")
        np.save(path, images.astype(np.float32))
        points.append(dict(snap, minutes=minutes, images=path,
                           sample_seconds=time.perf_counter() - start))
        if spec.get("conditioning_check") and minutes == max(spec["minutes"]):
            check = dict(minutes=minutes, images=path)
            null = model.null_text_id
            variants = dict(swap=(ids[1:] + ids[:1], spec["seed"], None),
                            uncond=([[null] * len(i) for i in ids], spec["seed"], 1.0),
                            cfg1=(ids, spec["seed"], 1.0), reseed=(ids, spec["seed"] + 1, None))
            for name, (prompts, seed, cfg) in variants.items():
                images = sample_images(ema, state, prompts, grid, patch, seed, peer, cfg)
                check[name] = os.path.join(out_dir, f"images_{name}.npy")
                np.save(check[name], images.astype(np.float32))
    return dict(torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                params=sum(p.numel() for p in model.parameters()),
                processing_strategy=model.modality_processing, points=points,
                conditioning_check=check)


def image_seconds(shape_name: str, steps: int, cfg_scale: float) -> dict:
    """One CFG image at a throughput-benchmark shape (random weights: the work per step
    does not depend on them), after an untimed 2-point warm-up call."""
    import workloads
    from reference_transfusion_pytorch import build_model as build_benchmark_model

    shape = workloads.SHAPES[shape_name]
    model = build_benchmark_model(shape).eval()
    prompt = torch.arange(10, 22)  # 12 caption ids, as benchmarks/inference.py's prompt
    calls = []
    model.transformer.register_forward_hook(lambda *_: calls.append(1))

    def sample(points: int):
        model.sample_many([prompt], force_modality_at_start=(0, shape.grid),
                          modality_steps=points, cfg_scale=cfg_scale, max_length=1)

    sample(2)
    calls.clear()
    start, cpu_start = time.perf_counter(), time.process_time()
    sample(steps)
    return dict(image_s=time.perf_counter() - start, image_cpu_s=time.process_time() - cpu_start,
                settings=dict(modality_steps=steps, ode_method=model.odeint_fn.keywords["method"],
                              cfg_scale=cfg_scale, transformer_calls=len(calls),
                              prompt_text_tokens=len(prompt), latent_grid=list(shape.grid),
                              patch_dim=shape.patch_dim),
                torch_version=torch.__version__, torch_threads=torch.get_num_threads())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", help="quality mode: the driver's peer_spec.json")
    parser.add_argument("--out", help="quality mode: directory for the sampled images")
    parser.add_argument("--image-seconds", action="store_true", help="time one image instead")
    parser.add_argument("--shape", default="cpu-s", help="--image-seconds: benchmark shape")
    parser.add_argument("--steps", type=int, default=250, help="--image-seconds: ODE points")
    parser.add_argument("--cfg-scale", type=float, default=3.0)
    args = parser.parse_args()
    torch.set_num_threads(NUM_THREADS)
    from loguru import logger  # the library logs one INFO line per sampled image
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.image_seconds:
        result = image_seconds(args.shape, args.steps, args.cfg_scale)
    else:
        if not (args.spec and args.out):
            parser.error("--spec and --out are needed unless --image-seconds")
        result = run_quality(args.spec, args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
