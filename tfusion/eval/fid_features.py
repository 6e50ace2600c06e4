"""A small FID feature network for the built-in `shapes` data.

Inception-v3 features (the FID standard) describe natural photos; on 16 px
synthetic shapes they are both slow and blind to what matters here. Instead a tiny
CNN is trained to read every grid cell's shape, colour and size, and its
penultimate layer is the FID feature space: distances there measure exactly the
attributes the dataset varies. It trains in about a minute on CPU
(`python -m launch.train_fid_features --out=PATH`) and is cached as one .npz.

FID values in this space are comparable only between runs using the same feature
file (same image size, same seed); they are not comparable with Inception FIDs.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data_pipelines import shapes

_log = logging.getLogger(__name__)

CELLS = 9
SHAPE_CLASSES = ("none",) + shapes.SHAPES
COLOR_CLASSES = ("none",) + tuple(shapes.COLORS)
SIZE_CLASSES = ("none",) + tuple(shapes.SIZES)
HEADS = (("shape", SHAPE_CLASSES), ("color", COLOR_CLASSES), ("size", SIZE_CLASSES))
FEATURE_DIM = 128
TRAIN_SEED = 7  # a scene stream of its own, distinct from the train (0) and eval (1) splits


class ShapesFeatureNet(nnx.Module):
    """conv 32 -> conv 64 /2 -> conv 64 /2 -> dense 128 (features) -> per-cell heads."""

    def __init__(self, image_size: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(3, 32, (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, (3, 3), strides=2, rngs=rngs)
        self.conv3 = nnx.Conv(64, 64, (3, 3), strides=2, rngs=rngs)
        # Flatten, not pool: the grid position of each shape is part of the label.
        side = -(-(-(-image_size // 2)) // 2)
        self.features = nnx.Linear(side * side * 64, FEATURE_DIM, rngs=rngs)
        self.heads = nnx.Linear(FEATURE_DIM, CELLS * sum(len(c) for _, c in HEADS), rngs=rngs)

    def embed(self, images: jax.Array) -> jax.Array:
        """images [N, H, W, 3] in [-1, 1] -> features [N, FEATURE_DIM] (pre-activation:
        closer to Gaussian than ReLU outputs, which FID's model assumes)."""
        x = nnx.relu(self.conv1(images))
        x = nnx.relu(self.conv2(x))
        x = nnx.relu(self.conv3(x))
        return self.features(x.reshape(x.shape[0], -1))

    def __call__(self, images: jax.Array) -> dict:
        logits = self.heads(nnx.relu(self.embed(images))).reshape(images.shape[0], CELLS, -1)
        out, start = {}, 0
        for name, classes in HEADS:
            out[name] = logits[..., start:start + len(classes)]
            start += len(classes)
        return out


def scene_labels(scene: shapes.Scene) -> dict:
    """Per-cell class indices {head: int [9]}; 0 = empty cell."""
    labels = {name: np.zeros(CELLS, np.int32) for name, _ in HEADS}
    for spec in scene.shapes:
        cell = spec.row * 3 + spec.col
        labels["shape"][cell] = SHAPE_CLASSES.index(spec.shape)
        labels["color"][cell] = COLOR_CLASSES.index(spec.color)
        labels["size"][cell] = SIZE_CLASSES.index(spec.size)
    return labels


def training_batch(start: int, count: int, image_size: int, max_shapes: int = 3):
    scenes = [shapes.make_scene(TRAIN_SEED, i, max_shapes) for i in range(start, start + count)]
    images = np.stack([shapes.render_scene(s, image_size) for s in scenes])
    images = images.astype(np.float32) / 127.5 - 1.0
    labels = [scene_labels(s) for s in scenes]
    return images, {name: np.stack([l[name] for l in labels]) for name, _ in HEADS}


def _loss(model: ShapesFeatureNet, images, labels):
    logits = model(images)
    per_head = [optax.softmax_cross_entropy_with_integer_labels(logits[n], labels[n]).mean()
                for n, _ in HEADS]
    return sum(per_head), logits


def _accuracy(logits: dict, labels: dict) -> float:
    """Fraction of (cell, head) predictions that are right."""
    hits = [np.asarray(jnp.argmax(logits[n], -1) == labels[n]).mean() for n, _ in HEADS]
    return float(np.mean(hits))


def train_feature_net(image_size: int, steps: int = 600, batch_size: int = 128,
                      learning_rate: float = 2e-3, seed: int = 0, log_every: int = 100):
    """Trains on freshly rendered scenes (never repeated); returns (model, metrics)."""
    model = ShapesFeatureNet(image_size, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        (loss, _), grads = nnx.value_and_grad(_loss, has_aux=True)(model, images, labels)
        optimizer.update(model, grads)
        return loss

    start = time.perf_counter()
    for i in range(steps):
        images, labels = training_batch(i * batch_size, batch_size, image_size)
        loss = step(model, optimizer, images, labels)
        if log_every and (i + 1) % log_every == 0:
            _log.info("fid features step %d/%d loss %.4f", i + 1, steps, float(loss))
    # Held-out accuracy on scenes past the training range.
    images, labels = training_batch(steps * batch_size, 512, image_size)
    metrics = {"heldout_accuracy": _accuracy(nnx.jit(lambda m, x: m(x))(model, images), labels),
               "train_seconds": time.perf_counter() - start, "steps": steps,
               "image_size": image_size}
    return model, metrics


def save_feature_net(model: ShapesFeatureNet, metrics: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    flat = {"/".join(map(str, k)): np.asarray(v)
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(path, __metrics__=json.dumps(metrics), **flat)


def load_feature_net(path: str) -> tuple[ShapesFeatureNet, dict]:
    with np.load(path, allow_pickle=False) as f:
        metrics = json.loads(str(f["__metrics__"]))
        arrays = {k: f[k] for k in f.files if k != "__metrics__"}
    model = ShapesFeatureNet(int(metrics["image_size"]), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    for key, variable in nnx.to_flat_state(state):
        name = "/".join(map(str, key))
        if name not in arrays or arrays[name].shape != variable.value.shape:
            raise ValueError(f"{path}: parameter {name} missing or of the wrong shape")
        variable.value = jnp.asarray(arrays[name])
    nnx.update(model, state)
    return model, metrics


def default_path(image_size: int) -> str:
    cache = os.environ.get("TFUSION_CACHE", os.path.expanduser("~/.cache/tfusion"))
    return os.path.join(cache, "fid_features", f"shapes_{image_size}px.npz")


def shapes_feature_fn(image_size: int, path: str = "") -> Callable[[np.ndarray], np.ndarray]:
    """images [N, H, W, 3] in [-1, 1] -> features [N, 128]; the network is loaded from
    `path` (default: the cache), trained and cached first if the file is missing."""
    path = path or default_path(image_size)
    if not os.path.exists(path):
        _log.warning("no FID feature network at %s: training one (~1 min)", path)
        # Every process of a multi-process run trains the same network (on its own
        # device); only the primary writes the cache file.
        model, metrics = train_feature_net(image_size)
        if jax.process_index() == 0:
            save_feature_net(model, metrics, path)
    else:
        model, metrics = load_feature_net(path)
    if metrics["image_size"] != image_size:
        raise ValueError(f"{path} was trained at {metrics['image_size']} px, images are "
                         f"{image_size} px")
    embed = nnx.jit(lambda m, x: m.embed(x))
    return lambda images: np.asarray(embed(model, jnp.asarray(images, jnp.float32)))
