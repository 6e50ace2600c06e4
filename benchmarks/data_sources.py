"""The sharded web sources: throughput per source and memory against corpus size
-> benchmarks/results/data_sources.json.

  python benchmarks/data_sources.py [--seconds=20] [--memory_gb=2]

Throughput rows (one core: the pipeline in-process, num_workers=0), each source alone
through make_train_iterator with the paper's image geometry (256 px images -> 256
patches; seq_len 4096, 15 image slots, 4 rows per batch):
  webdataset    .tar shards, JPEG q90 of 320x256 px scenes with sensor-like noise,
                centre-cropped and resized to 256 px (identity latents 256x256x3,
                patch 16)
  parquet       the same images as Hugging Face datasets writes them ({bytes, path})
  interleaved   parquet web documents: 2-3 of those images between paragraphs
  precomputed   the same pairs as latents written once (32x32x4 float32 = what an f8
                VAE gives at 256 px, patch 2): reading, no decoding
  text          .jsonl shards of ~2 KB documents (text-only stream)
records/s and MB/s count shard bytes per record read (mean file bytes per record),
timed after the first batch.

Memory: peak RSS (ru_maxrss) and RSS after the batches of a process that indexes a
text corpus of 16 .jsonl shards and reads 50 batches from it, for a 20 MB and a
`memory_gb` corpus (each in its own process), and the index's own bytes.

What a v5p host needs for transfusion_0.16B (derivation in the result's
`v5p_host_need`): the step's analytic FLOPs (benchmarks/results/compile/, AOT on
v5p-128) at an assumed 40% MFU of 64 chips at 459 TFLOP/s bf16 give the step time;
512 rows x 4096 positions over 16 hosts, half the positions image documents of 256
patches + ~30 caption/marker tokens, give images and text tokens per host per second.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.timing import cpu_model, write_result  # noqa: E402
from data_pipelines import builtin_text, example_config, make_train_iterator, shapes  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORDS = " ".join(builtin_text.english_sentences()).lower().replace(".", "").split()
PAIRS = 512  # distinct image-caption pairs per image corpus


def _jpeg(index: int) -> tuple[bytes, str]:
    scene = shapes.make_scene(11, index)
    pixels = shapes.render_scene(scene, 320).astype(np.int16)[:, :, :]
    noise = np.random.default_rng(index).normal(0, 8, pixels.shape)
    image = np.clip(pixels + noise, 0, 255).astype(np.uint8)[32:288]  # 256 x 320
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), scene.caption()


def _text(rng, words: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), words))


def write_corpora(root: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.latents_source import METADATA_FILE, encode_record, shard_name

    pairs = [_jpeg(i) for i in range(PAIRS)]
    out = {}
    os.makedirs(f"{root}/wds")
    for s in range(4):
        with tarfile.open(f"{root}/wds/{s:05d}.tar", "w") as tar:
            for j in range(PAIRS // 4):
                image, caption = pairs[s * PAIRS // 4 + j]
                for ext, data in (("jpg", image), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:05d}{j:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out["webdataset"] = f"{root}/wds/*.tar"
    os.makedirs(f"{root}/parquet")
    for s in range(2):
        part = pairs[s * PAIRS // 2:(s + 1) * PAIRS // 2]
        pq.write_table(pa.table({"image": [{"bytes": b, "path": None} for b, _ in part],
                                 "caption": [c for _, c in part]}),
                       f"{root}/parquet/{s:05d}.parquet", row_group_size=64)
    out["parquet"] = f"{root}/parquet/*.parquet"
    os.makedirs(f"{root}/interleaved")
    rng = np.random.default_rng(0)
    texts, images = [], []
    for d in range(PAIRS // 2):
        t, im = [_text(rng, 60)], [None]
        for k in range(2 + d % 2):
            image, caption = pairs[(3 * d + k) % PAIRS]
            t += [None, f"{caption}. {_text(rng, 40)}"]
            im += [image, None]
        texts.append(t)
        images.append(im)
    pq.write_table(pa.table({"texts": texts, "images": images}),
                   f"{root}/interleaved/docs.parquet", row_group_size=32)
    out["interleaved"] = f"{root}/interleaved/*.parquet"
    latents = f"{root}/latents"
    from array_record.python import array_record_module

    for split, n in (("train", PAIRS), ("eval", 16)):
        path = os.path.join(latents, shard_name(split, 0, 1))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        for i in range(n):
            latent = rng.normal(size=(32, 32, 4)).astype(np.float32)
            writer.write(encode_record(pairs[i][1], latent))
        writer.close()
    with open(os.path.join(latents, METADATA_FILE), "w") as f:
        json.dump({"format_version": 1, "encoder": "vae", "latent_shape": [32, 32, 4],
                   "latent_dtype": "float32", "image_size": 256, "source": "webdataset",
                   "num_examples": {"train": PAIRS, "eval": 16}}, f)
    out["precomputed"] = latents
    write_text_corpus(f"{root}/text", 16, 8 << 20)
    out["text"] = f"{root}/text/*.jsonl"
    return out


def write_text_corpus(directory: str, shards: int, total_bytes: int) -> None:
    """`shards` .jsonl files of ~2 KB documents, `total_bytes` in all (documents cycle
    through 4096 distinct ones with a running number, so writing 2 GB is fast)."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(1)
    distinct = [_text(rng, 330) for _ in range(4096)]
    per_shard = total_bytes // shards
    n = 0
    for s in range(shards):
        with open(f"{directory}/{s:05d}.jsonl", "w") as f:
            written = 0
            while written < per_shard:
                line = json.dumps({"id": n, "text": distinct[n % 4096]}) + "\n"
                f.write(line)
                written += len(line)
                n += 1


def _config(source: str, path: str):
    c = example_config.get_config()
    c.train.batch_size = 4
    c.data.update(seq_len=4096, max_images_per_row=15, image_size=256, shuffle_block=64,
                  eval_examples=16, mixture_probe_docs=8, multi_image_fraction=0.0,
                  num_workers=0)
    c.model.update(latent_height=256, latent_width=256, latent_channels=3, patch_size=16)
    if source == "text":
        c.data.update(source="none", text_source="files", text_files=path)
    else:
        c.data.update(source=source, data_dir=path, text_source="none")
    if source == "precomputed":
        c.data.update(encoder="precomputed", encoder_path=path)
        c.model.update(latent_height=32, latent_width=32, latent_channels=4, patch_size=2)
    return c


def _corpus_bytes(source: str, path: str) -> int:
    import glob

    if source == "precomputed":
        return sum(os.path.getsize(p) for p in glob.glob(f"{path}/train/*"))
    return sum(os.path.getsize(p) for p in glob.glob(path))


def measure(source: str, path: str, seconds: float) -> dict:
    from data_pipelines.sources import entry_records
    from data_pipelines.mixture import mixture_entries

    config = _config(source, path)
    records = len(entry_records(config.data, mixture_entries(config.data)[0], "train"))
    bytes_per_record = _corpus_bytes(source, path) / (records + config.data.eval_examples)
    start = time.perf_counter()
    it = make_train_iterator(config)
    next(it)
    startup = time.perf_counter() - start
    read0, tokens0 = it.data_counts()["data_records_read"], it.stats().nonpad_tokens
    batches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        batches += 1
    elapsed = time.perf_counter() - start
    read = it.data_counts()["data_records_read"] - read0
    stats = it.stats()
    return {"source": source, "batches": batches, "seconds": elapsed, "startup_s": startup,
            "records_per_s": read / elapsed,
            "mb_per_s": read * bytes_per_record / elapsed / 1e6,
            "bytes_per_record": bytes_per_record,
            "packed_tokens_per_s": (stats.nonpad_tokens - tokens0) / elapsed,
            "images_per_s": stats.images / stats.batches * batches / elapsed,
            "packing_efficiency": stats.packing_efficiency, "skipped": stats.skipped}


MEMORY_CHILD = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from benchmarks.data_sources import _config
from data_pipelines import make_train_iterator
from data_pipelines.web_sources import text_records
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
before = rss_mb()
it = make_train_iterator(_config("text", {pattern!r}))
for _ in range(50):
    next(it)
print(json.dumps({{"max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_pipeline_mb": before, "rss_after_50_batches_mb": rss_mb(),
                  "index_bytes": text_records({pattern!r}, "text", 64).base.index_bytes(),
                  "records_read": it.data_counts()["data_records_read"]}}))
"""


def memory(root: str, gigabytes: float) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = {}
    for label, size in (("20MB", 20 << 20), (f"{gigabytes:g}GB", int(gigabytes * (1 << 30)))):
        directory = f"{root}/memory_{label}"
        start = time.perf_counter()
        write_text_corpus(directory, 16, size)
        written = time.perf_counter() - start
        code = MEMORY_CHILD.format(repo=repo, pattern=f"{directory}/*.jsonl")
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row.update(corpus_bytes=_corpus_bytes("text", f"{directory}/*.jsonl"),
                   write_s=written, run_s=time.perf_counter() - start)
        out[label] = row
        subprocess.run(["rm", "-rf", directory], check=True)
    labels = list(out)
    out["rss_difference_mb"] = out[labels[1]]["max_rss_mb"] - out[labels[0]]["max_rss_mb"]
    out["rss_after_difference_mb"] = (out[labels[1]]["rss_after_50_batches_mb"]
                                      - out[labels[0]]["rss_after_50_batches_mb"])
    return out


def v5p_host_need(rows: dict) -> dict:
    with open(os.path.join(RESULTS, "compile", "transfusion_0.16B_v5p-128.json")) as f:
        aot = json.load(f)
    chips, peak, mfu, hosts = aot["devices"], 459e12, 0.40, aot["devices"] // 4
    step_s = aot["analytic_flops"] / (chips * peak * mfu)
    positions = aot["batch"]["rows"] * aot["batch"]["seq_len"] / hosts
    images = 0.5 * positions / (256 + 30)
    need = {"assumptions": f"step = analytic_flops / ({chips} chips x 459 TFLOP/s x "
                           f"{mfu:.0%} MFU); {hosts} hosts (4 chips each); half of each "
                           "host's positions are image documents of 256 patches + ~30 "
                           "text/marker tokens, half text",
            "step_s": step_s, "images_per_s_per_host": images / step_s,
            "text_tokens_per_s_per_host": 0.5 * positions / step_s}
    for source, row in rows.items():
        if source != "text":
            need[f"cores_for_images_{source}"] = need["images_per_s_per_host"] / row["images_per_s"]
    need["cores_for_text"] = need["text_tokens_per_s_per_host"] / rows["text"]["packed_tokens_per_s"]
    return need


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--memory_gb", type=float, default=2)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--out", default=os.path.join(RESULTS, "data_sources.json"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        corpora = write_corpora(root)
        for source, path in corpora.items():
            rows[source] = measure(source, path, args.seconds)
            print(json.dumps({k: rows[source][k] for k in
                              ("source", "records_per_s", "mb_per_s", "images_per_s",
                               "packed_tokens_per_s")}), flush=True)
        mem = None if args.skip_memory else memory(root, args.memory_gb)
        if mem:
            print(json.dumps(mem), flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "processor": cpu_model()},
        "workers": 0, "rows": rows, "memory": mem, "v5p_host_need": v5p_host_need(rows),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
