"""Web-format shards written with the standard tools (tarfile, pyarrow, gzip), holding
real PNG/JPEG bytes of shapes scenes and faults at known places. Each writer returns
the ground truth: per record, in shard order, the skip reason it must be counted
under ("" = usable)."""
import gzip
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_pipelines.shapes import make_scene, render_scene


def scene(i: int, seed: int = 0, px: int = 16):
    s = make_scene(seed, i, 3)
    return render_scene(s, px), s.caption()


def encoded(pixels, kind: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG" if kind == "jpg" else "PNG",
                                 **({"quality": 95} if kind == "jpg" else {}))
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# Faults of webdataset samples, by sample number within the corpus.
WDS_FAULTS = {3: "corrupt_image", 7: "missing_caption", 11: "missing_image_member",
              16: "bad_metadata_json"}
WDS_JSON_CAPTION = frozenset({5, 13})  # caption only in the .json member


def write_webdataset(directory, shards: int = 3, per_shard: int = 8, seed: int = 0,
                     faults=None) -> list[str]:
    """img2dataset-style shards 00000.tar...; returns the outcome of every sample."""
    faults = WDS_FAULTS if faults is None else faults
    outcomes = []
    for s in range(shards):
        with tarfile.open(directory / f"{s:05d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                key = f"{s:05d}{j:04d}"
                pixels, caption = scene(i, seed)
                kind = "jpg" if i % 2 else "png"
                image = encoded(pixels, kind)
                fault = faults.get(i, "")
                if fault == "corrupt_image":
                    image = image[:len(image) // 3]
                if fault != "missing_image_member":
                    _add(tar, f"{key}.{kind}", image)
                if fault == "bad_metadata_json":
                    _add(tar, f"{key}.json", b"{not json")
                elif i in WDS_JSON_CAPTION:
                    _add(tar, f"{key}.json", json.dumps({"caption": caption, "width": 16}).encode())
                elif fault != "missing_caption":
                    _add(tar, f"{key}.txt", caption.encode())
                    _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
                outcomes.append(fault)
    return outcomes


def write_truncated_tar(path, samples: int = 6, keep_fraction: float = 0.6) -> int:
    """A shard cut off mid-file (an interrupted upload); returns the samples whose
    members all precede the cut."""
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for j in range(samples):
            pixels, caption = scene(1000 + j)
            _add(tar, f"t{j:04d}.png", encoded(pixels))
            _add(tar, f"t{j:04d}.txt", caption.encode())
            ends.append(buf.tell())
    data = buf.getvalue()
    kept = int(samples * keep_fraction)
    cut = ends[kept - 1] + 700  # inside the next sample's image data
    path.write_bytes(data[:cut])
    return kept


PARQUET_FAULTS = {2: "missing_caption", 6: "corrupt_image", 9: "missing_image"}


def write_parquet(directory, files: int = 2, rows: int = 10, row_group: int = 4,
                  seed: int = 0, faults=None) -> list[str]:
    """Hugging Face datasets-style parquet: image = {bytes, path} struct, caption."""
    faults = PARQUET_FAULTS if faults is None else faults
    outcomes = []
    for f in range(files):
        images, captions = [], []
        for j in range(rows):
            i = f * rows + j
            pixels, caption = scene(i, seed)
            image = encoded(pixels, "jpg" if i % 3 == 0 else "png")
            fault = faults.get(i, "")
            if fault == "corrupt_image":
                image = b"\x89PNG garbage"
            images.append(None if fault == "missing_image" else {"bytes": image,
                                                                 "path": f"{i}.png"})
            captions.append(None if fault == "missing_caption" else caption)
            outcomes.append(fault)
        table = pa.table({"image": images, "caption": captions})
        pq.write_table(table, directory / f"train-{f:05d}-of-{files:05d}.parquet",
                       row_group_size=row_group)
    return outcomes


INTERLEAVED_FAULTS = {1: "missing_image", 4: "bad_interleaved_row", 6: "no_image_in_document"}


def write_interleaved(directory, rows: int = 8, seed: int = 0, as_jsonl: bool = False,
                      faults=None) -> list[str]:
    """OBELICS-style documents: texts / images lists, null where the other stands.
    Row i holds 1 + i % 2 images, each followed by its caption; jsonl names image
    files written beside it."""
    faults = INTERLEAVED_FAULTS if faults is None else faults
    docs, outcomes = [], []
    for i in range(rows):
        texts, images = ["a page about shapes ."], [None]
        for k in range(1 + i % 2):
            pixels, caption = scene(100 * i + k, seed)
            data = encoded(pixels)
            if as_jsonl:
                name = f"img_{i}_{k}.png"
                (directory / name).write_bytes(data)
                data = name
            texts += [None, caption]
            images += [data, None]
        fault = faults.get(i, "")
        if fault == "missing_image" and not as_jsonl:
            images[1], fault = b"", "empty_image_bytes"  # HF writes b"" for a lost image
        elif fault == "missing_image":
            images[1] = "absent.png"
        elif fault == "bad_interleaved_row":
            texts = texts[:-1]
        elif fault == "no_image_in_document":
            texts, images = ["only text here ."], [None]
        docs.append({"texts": texts, "images": images})
        outcomes.append(fault)
    if as_jsonl:
        (directory / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    else:
        pq.write_table(pa.table({"texts": [d["texts"] for d in docs],
                                 "images": [d["images"] for d in docs]}),
                       directory / "docs.parquet", row_group_size=3)
    return outcomes


def write_text_shards(directory, seed: int = 0) -> list[str]:
    """The same kind of corpus as .txt, .jsonl.gz and .parquet shards; returns the
    outcome of every record (the .jsonl.gz holds one line without the text key, the
    parquet one null text)."""
    outcomes = []
    lines = [scene(5000 + i, seed)[1] for i in range(30)]
    (directory / "a.txt").write_text("\n".join(lines[:10]) + "\n\n")
    outcomes += [""] * 10
    rows = [json.dumps({"text": t}) for t in lines[10:20]]
    rows[4] = json.dumps({"body": lines[14]})
    with gzip.open(directory / "b.jsonl.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    outcomes += ["bad_metadata_line" if k == 4 else "" for k in range(10)]
    texts = lines[20:30]
    texts[7] = None
    pq.write_table(pa.table({"text": texts}), directory / "c.parquet", row_group_size=4)
    outcomes += ["missing_text" if k == 7 else "" for k in range(10)]
    return outcomes


def png_rng(seed: int) -> bytes:
    return encoded(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8))
