"""Peak host memory of `launch.import_hf` on a sharded checkpoint, against its largest
tensor.

    python benchmarks/import_hf_memory.py        # ~1 min; writes results/import_hf_memory.json

Writes a Llama-format checkpoint here (numpy random weights, hidden 1024, MLP 4096,
4 layers, 6 safetensors shards with model.safetensors.index.json, a byte-level BPE
tokenizer.json), then imports it in a fresh process that reports its resident set
size before the conversion (imports, mesh, tokenizer: the fixed overhead) and its peak
(ru_maxrss) after. On the CPU backend the imported params' device buffers are host
memory too, so the import's own transient memory is peak - before - the params'
bytes; the target (issue 32) is that it stays below 2x the largest tfusion tensor
(one layer-stacked param): the import holds about one param at a time, never the
checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

HIDDEN, MLP, LAYERS, HEADS, KV_HEADS = 1024, 4096, 4, 8, 4
CORPUS = [f"the {c} {s} number {i}" for i in range(50)
          for c, s in (("red", "circle"), ("blue", "square"), ("green", "triangle"))]


def write_checkpoint(directory: str) -> int:
    """A sharded Llama checkpoint; returns its vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from tfusion.autoencoders.safetensors_io import save

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>"}, f)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    head_dim = HIDDEN // HEADS
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=MLP,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                       num_key_value_heads=KV_HEADS, vocab_size=vocab, rms_norm_eps=1e-5,
                       rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                       bos_token_id=tok.token_to_id("<s>"),
                       eos_token_id=tok.token_to_id("</s>")), f)
    rng = np.random.default_rng(0)
    w = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    shards = [{"model.embed_tokens.weight": w(vocab, HIDDEN), "lm_head.weight": w(vocab, HIDDEN),
               "model.norm.weight": np.ones(HIDDEN, np.float32)}]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shards.append({p + "self_attn.q_proj.weight": w(HIDDEN, HIDDEN),
                       p + "self_attn.k_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
                       p + "self_attn.v_proj.weight": w(KV_HEADS * head_dim, HIDDEN),
                       p + "self_attn.o_proj.weight": w(HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": w(MLP, HIDDEN),
                       p + "mlp.up_proj.weight": w(MLP, HIDDEN),
                       p + "mlp.down_proj.weight": w(HIDDEN, MLP),
                       p + "input_layernorm.weight": np.ones(HIDDEN, np.float32),
                       p + "post_attention_layernorm.weight": np.ones(HIDDEN, np.float32)})
    weight_map = {}
    for k, tensors in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save(os.path.join(directory, name), tensors, {"format": "pt"})
        weight_map.update({t: name for t in tensors})
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return vocab


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(hf_dir: str, workdir: str) -> None:
    """Runs in its own process: the import, with its memory before and at peak."""
    import jax

    from experiments import registry
    from tfusion.eval import hf_checkpoints
    from tfusion.train.state import abstract_params
    from tfusion import sharding

    base = registry.get_config("shapes_tiny")
    config, _, _, ckpt = hf_checkpoints.plan(hf_dir, base)  # warm the imports and caches
    ckpt.close()
    mesh = sharding.make_mesh(config.mesh)
    sizes = [int(np.prod(a.shape)) * 4 for a in
             jax.tree.leaves(abstract_params(config.model, mesh, sharding.mesh_rules(config.mesh)))]
    before = _rss_bytes()
    start = time.perf_counter()
    hf_checkpoints.import_hf(hf_dir, workdir, base)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(rss_before=before, rss_peak=peak, params_bytes=sum(sizes),
                          largest_tensor_bytes=max(sizes), seconds=seconds)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "import_hf_memory.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = os.path.join(tmp, "hf")
        os.makedirs(hf_dir)
        vocab = write_checkpoint(hf_dir)
        checkpoint_bytes = sum(os.path.getsize(os.path.join(hf_dir, f))
                               for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", hf_dir,
                               os.path.join(tmp, "run")], cwd=_ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    transient = r["rss_peak"] - r["rss_before"] - r["params_bytes"]
    result = dict(
        benchmark="import_hf_memory", command="python benchmarks/import_hf_memory.py",
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform()),
        checkpoint=dict(hidden=HIDDEN, mlp=MLP, layers=LAYERS, vocab=vocab, shards=LAYERS + 1,
                        bytes=checkpoint_bytes),
        rss_before_bytes=r["rss_before"], rss_peak_bytes=r["rss_peak"],
        params_bytes=r["params_bytes"], largest_tensor_bytes=r["largest_tensor_bytes"],
        transient_bytes=transient,
        transient_over_largest_tensor=transient / r["largest_tensor_bytes"],
        target="transient (peak - before - the params' device buffers, host memory on CPU) "
               "< 2 x the largest tensor",
        target_met=transient < 2 * r["largest_tensor_bytes"], import_seconds=r["seconds"])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    print(f"checkpoint {mib(checkpoint_bytes)} in {LAYERS + 1} shards; params "
          f"{mib(r['params_bytes'])}, largest tensor {mib(r['largest_tensor_bytes'])}; RSS "
          f"before {mib(r['rss_before'])}, peak {mib(r['rss_peak'])}; transient "
          f"{mib(transient)} = {result['transient_over_largest_tensor']:.2f}x the largest tensor "
          f"(target < 2x: {'met' if result['target_met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
