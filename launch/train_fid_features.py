"""Train the FID feature network for the built-in shapes data (~1 min on CPU).

  python -m launch.train_fid_features --out=~/.cache/tfusion/fid_features/shapes_16px.npz \\
      [--image_size=16 --steps=600]

The default --out is where the fid suite looks (tfusion.eval.fid_features.default_path);
the suite trains one itself if the file is missing.
"""
from __future__ import annotations

import json
import logging
import os

from absl import app, flags

_OUT = flags.DEFINE_string("out", "", "Output .npz; default: the cache path for image_size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 16, "Pixels (data.image_size of the runs).")
_STEPS = flags.DEFINE_integer("steps", 600, "Training steps (batches of 128 fresh scenes).")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation seed.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger("tfusion").setLevel(logging.INFO)
    from tfusion.eval import fid_features

    out = os.path.expanduser(_OUT.value or fid_features.default_path(_IMAGE_SIZE.value))
    model, metrics = fid_features.train_feature_net(_IMAGE_SIZE.value, steps=_STEPS.value,
                                                    seed=_SEED.value)
    fid_features.save_feature_net(model, metrics, out)
    print(json.dumps({"out": out, **metrics}, indent=2))


if __name__ == "__main__":
    app.run(main)
