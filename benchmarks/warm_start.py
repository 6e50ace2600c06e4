"""Warm starts at CPU scale (issue 32, docs/warm_start.md): does starting shapes_tiny from
a pretrained text LM help, and does LMFusion's recipe (untied image weights, text frozen)
keep the LM's text ability exactly?

  python benchmarks/warm_start.py [--root=/tmp/tfusion_warm_start] [--runs=scratch,shared,untied_frozen]
      [--seeds=0] [--lm_steps=600]

Stages; each is skipped when its output exists, so the script resumes where it stopped:
  corpus  captions of procedural shapes scenes (1-3 shapes each, seed 1000) as a .txt
          corpus, and 512 held-out captions from other scenes (seed 2000)
  lm      a text-only LM with shapes_tiny's backbone (and tokenizer) on that corpus
  export  the LM as a Hugging Face checkpoint (launch.export_hf, EMA params)
  import  back into a tfusion run directory (launch.import_hf --config=shapes_tiny)
  runs    shapes_tiny at its README steps, from scratch, warm-started from the import
          with shared weights, and warm-started untied (image twins copied from the text
          weights) with train.freeze=text
  report  held-out text perplexity of every model on the held-out captions (text-only
          documents: BOS caption EOS, EMA params), the shapes suite's final scores and
          the median step time -> benchmarks/results/warm_start.json
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.timing import cpu_model, write_result  # noqa: E402

CONFIG = "experiments/registry.py:shapes_tiny"
RUNS = {
    "scratch": [],
    "shared": ["--config.train.init_from={imported}"],
    "untied_frozen": ["--config.train.init_from={imported}",
                      "--config.model.modality_weights=untied",
                      "--config.model.untied_init=copy", "--config.train.freeze=('text',)"],
}
TRAIN_SCENES, HELDOUT_SCENES, HELDOUT_DOCS = 1000, 2000, 512


def _run(cmd: list[str], log: str) -> None:
    print("+", " ".join(cmd), flush=True)
    with open(log, "a") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)


def write_corpus(root: str, train_docs: int) -> dict:
    from data_pipelines.shapes import make_scene

    paths = dict(train=os.path.join(root, "corpus", "train.txt"),
                 heldout=os.path.join(root, "corpus", "heldout.txt"))
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(os.path.dirname(paths["train"]), exist_ok=True)
    for name, seed, n in (("train", TRAIN_SCENES, train_docs),
                          ("heldout", HELDOUT_SCENES, HELDOUT_DOCS)):
        with open(paths[name] + ".tmp", "w") as f:
            f.writelines(make_scene(seed, i).caption() + "\n" for i in range(n))
        os.replace(paths[name] + ".tmp", paths[name])
    return paths


def train_lm(root: str, corpus: dict, steps: int) -> str:
    workdir = os.path.join(root, "lm")
    if os.path.exists(os.path.join(workdir, "checkpoints", str(steps))):
        return workdir
    _run([sys.executable, "-m", "launch.train", f"--config={CONFIG}", f"--workdir={workdir}",
          "--config.name=text_lm_shapes", "--config.data.source=none",
          "--config.data.text_source=files", f"--config.data.text_files={corpus['train']}",
          "--config.data.text_token_share=1.0", f"--config.train.steps={steps}",
          "--config.train.final_eval_suite=", "--config.train.sample_every=0",
          f"--config.train.checkpoint_every={steps}", "--config.train.eval_every=0"],
         os.path.join(root, "lm.log"))
    return workdir


def export_and_import(root: str, lm: str) -> str:
    hf, imported = os.path.join(root, "lm_hf"), os.path.join(root, "imported")
    if not os.path.exists(os.path.join(hf, "config.json")):
        _run([sys.executable, "-m", "launch.export_hf", f"--workdir={lm}", f"--out={hf}"],
             os.path.join(root, "export.log"))
    if not os.path.exists(os.path.join(imported, "config.json")):
        _run([sys.executable, "-m", "launch.import_hf", f"--hf_dir={hf}",
              f"--workdir={imported}", f"--config={CONFIG}"], os.path.join(root, "import.log"))
    return imported


def train_run(root: str, name: str, seed: int, imported: str) -> str:
    workdir = os.path.join(root, f"{name}_s{seed}")
    if os.path.exists(os.path.join(workdir, "eval", "shapes.json")):
        return workdir
    _run([sys.executable, "-m", "launch.train", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.train.seed={seed}"] + [a.format(imported=imported) for a in RUNS[name]],
         os.path.join(root, f"{name}_s{seed}.log"))
    return workdir


def heldout_text_nll(workdir: str, texts: list[str], batch_rows: int = 32) -> dict:
    """Mean next-token NLL (nats) over the held-out captions as text-only documents
    (BOS caption EOS, one per row), EMA params; every target of every document counts."""
    import jax
    import jax.numpy as jnp

    from data_pipelines.tokenizer import build_tokenizer
    from tfusion import losses
    from tfusion.batch import BatchSpec, assemble_rows
    from tfusion.eval.checkpoints import load_model

    model, config, step = load_model(workdir, params="ema")
    tok = build_tokenizer(config)
    cfg = model.cfg
    docs = [np.asarray([tok.bos_id] + tok.encode(t) + [tok.eos_id], np.int32) for t in texts]
    seq_len = max(len(d) for d in docs)
    spec = BatchSpec(batch_rows, seq_len, 1, (cfg.latent_height, cfg.latent_width,
                                              cfg.latent_channels), cfg.patch_size)

    @jax.jit
    def sums(batch):
        logits, _ = model(batch, batch["images"], jnp.zeros(batch["image_mask"].shape))
        nll, _ = losses.next_token_nll(logits, batch["tokens"])
        weights = losses.lm_target_weights(batch["segment_ids"], batch["image_index"])
        return jnp.sum(nll * weights), jnp.sum(weights)

    total, count = 0.0, 0.0
    for start in range(0, len(docs), batch_rows):
        rows = [[[d]] for d in docs[start:start + batch_rows]]  # a row: one document
        rows += [[] for _ in range(batch_rows - len(rows))]
        batch = {k: jnp.asarray(v) for k, v in assemble_rows(rows, spec, cfg.pad_id).items()}
        s, c = sums(batch)
        total, count = total + float(s), count + float(c)
    return dict(text_nll=total / count, perplexity=math.exp(total / count),
                targets=int(count), step=int(step))


def run_summary(workdir: str) -> dict:
    train = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step_s = [m["step_s"] for m in train if m.get("split") == "train" and "step_s" in m]
    out = dict(step_s_median=float(np.median(step_s[1:])) if len(step_s) > 1 else None)
    shapes = os.path.join(workdir, "eval", "shapes.json")
    if os.path.exists(shapes):
        scores = json.load(open(shapes))
        flat = {}

        def walk(d, prefix=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}/")
                elif isinstance(v, (int, float)):
                    flat[prefix + k] = v
        walk(scores["metrics"])
        out.update(generation_exact=flat.get("generation/exact"),
                   captioning_exact=flat.get("captioning/exact"), cider=flat.get("cider"),
                   captioning_shape_ceiling=flat.get("captioning_shape_ceiling"))
    report = os.path.join(workdir, "warm_start.json")
    if os.path.exists(report):
        r = json.load(open(report))
        out.update(warm_loaded_tensors=len(r["loaded"]), warm_new_tensors=len(r["new"]),
                   warm_copied_from_text=len(r.get("copied_from_text", [])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default="/tmp/tfusion_warm_start")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--lm_steps", type=int, default=600)
    ap.add_argument("--train_docs", type=int, default=200_000)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "warm_start.json"))
    args = ap.parse_args()
    os.makedirs(args.root, exist_ok=True)
    corpus = write_corpus(args.root, args.train_docs)
    lm = train_lm(args.root, corpus, args.lm_steps)
    imported = export_and_import(args.root, lm)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in filter(None, args.runs.split(",")):
            train_run(args.root, name, seed, imported)
    heldout = [line.strip() for line in open(corpus["heldout"]) if line.strip()]
    results = dict(lm=dict(workdir=lm, **heldout_text_nll(lm, heldout)),
                   imported=dict(workdir=imported, **heldout_text_nll(imported, heldout)),
                   runs={})
    for workdir in sorted(glob.glob(os.path.join(args.root, "*_s[0-9]*"))):
        name = os.path.basename(workdir)
        if not os.path.exists(os.path.join(workdir, "eval", "shapes.json")):
            continue
        results["runs"][name] = dict(workdir=workdir, **run_summary(workdir),
                                     **heldout_text_nll(workdir, heldout))
    write_result(args.out, dict(
        command="python benchmarks/warm_start.py " + " ".join(sys.argv[1:]),
        machine=cpu_model(), lm_steps=args.lm_steps, train_docs=args.train_docs,
        heldout_docs=len(heldout), **results))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
