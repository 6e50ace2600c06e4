"""Data pipeline throughput and packing efficiency -> benchmarks/results/data_pipeline.json.

  python benchmarks/data_pipeline.py [--batches=30] [--workers=0,1,2]

Two scenarios, each with 0, 1 and 2 grain worker processes:
  shapes_64px:    the built-in shapes set at 64 px (identity latents 64x64x3, patch 4
                  -> 256 patches), captions as text, seq_len 2048.
  realistic_mix:  shapes images at 64 px with captions of 8-120 words, 1-2 images per
                  document (half interleaved), text documents of log-normal length
                  (median ~300 words, up to 3000), seq_len 4096, 1:1 token mixture.
packed tokens/s counts non-pad positions of the batches, timed after the first batch
(worker start-up is reported separately as startup_s).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import grain
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import write_result  # noqa: E402
from data_pipelines import builtin_text, example_config, make_train_iterator, shapes  # noqa: E402
from data_pipelines.records import ImageCaptionRecord, TextRecord  # noqa: E402

WORDS = " ".join(builtin_text.english_sentences()[:12]).lower().replace(".", "").split()


def _words(rng, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def _captioned_image(index: int) -> ImageCaptionRecord:
    rng = np.random.default_rng([7, index])
    scene = shapes.make_scene(7, index)
    filler = max(0, int(rng.integers(8, 121)) - len(scene.caption().split()))
    return ImageCaptionRecord(shapes.render_scene(scene, 64),
                              f"{scene.caption()} {_words(rng, filler)}".strip())


def _text(index: int) -> TextRecord:
    rng = np.random.default_rng([8, index])
    return TextRecord(_words(rng, int(min(3000, max(5, rng.lognormal(np.log(300), 0.8))))))


def scenario_config(name: str, workers: int):
    c = example_config.get_config()
    c.train.batch_size = 8
    c.model.latent_height = c.model.latent_width = 64
    c.model.patch_size = 4
    c.data.image_size = 64
    c.data.num_workers = workers
    c.data.worker_buffer_size = 4
    if name == "shapes_64px":
        c.data.seq_len, c.data.max_images_per_row = 2048, 8
    else:
        c.data.seq_len, c.data.max_images_per_row = 4096, 16
        c.data.multi_image_fraction, c.data.max_images_per_document = 0.5, 2
    return c


def measure(name: str, workers: int, batches: int) -> dict:
    config = scenario_config(name, workers)
    overrides = {}
    if name == "realistic_mix":
        overrides = dict(image_records=grain.MapDataset.range(1_000_000).map(_captioned_image),
                         text_records=grain.MapDataset.range(1_000_000).map(_text))
    start = time.perf_counter()
    it = make_train_iterator(config, **overrides)
    next(it)
    startup = time.perf_counter() - start
    before = it.stats().nonpad_tokens
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    stats = it.stats()
    it.close()
    return {
        "scenario": name, "workers": workers, "batches": batches,
        "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
        "image_size": config.data.image_size, "patches_per_image": it.spec.patches_per_image,
        "tokens_per_s": (stats.nonpad_tokens - before) / elapsed,
        "batches_per_s": batches / elapsed, "startup_s": startup,
        "packing_efficiency": stats.packing_efficiency,
        "images_per_batch": stats.images / stats.batches,
        "documents": stats.documents, "split_text_documents": stats.split_text_documents,
        "skipped": stats.skipped, "mixture_document_probabilities": it.mixture_weights,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "data_pipeline.json"))
    args = parser.parse_args()
    runs = []
    for name in ("shapes_64px", "realistic_mix"):
        for workers in [int(w) for w in args.workers.split(",")]:
            run = measure(name, workers, args.batches)
            print(json.dumps({k: run[k] for k in ("scenario", "workers", "tokens_per_s",
                                                   "packing_efficiency", "startup_s")}))
            runs.append(run)
    mix = [r for r in runs if r["scenario"] == "realistic_mix"]
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "processor": platform.processor()},
        "packing_efficiency": min(r["packing_efficiency"] for r in mix),
        "tokens_per_s": {f"{r['scenario']}/workers={r['workers']}": r["tokens_per_s"]
                         for r in runs},
        "workers": sorted({r["workers"] for r in runs}),
        "runs": runs,
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
