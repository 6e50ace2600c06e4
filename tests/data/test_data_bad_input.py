"""Fuzz: malformed records through the folder and ArrayRecord sources never crash and
are each counted exactly once (packed, or skipped by reason; repairs counted too)."""
import collections
import io
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines import example_config, make_train_iterator, sources
from data_pipelines.documents import DocumentBuilder, DocumentOptions, image_documents
from data_pipelines.file_sources import CAPTIONS_FILE, write_array_records
from data_pipelines.packing import STATS_KEY, PackingIterDataset
from data_pipelines.pipeline import batch_spec
from data_pipelines.stats import PipelineStats
from data_pipelines.tokenizer import build_tokenizer
from tfusion.batch import validate_batch

OK = "document"


def png(array, mode=None, fmt="PNG", **kw):
    buf = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def labelled_records(rng):
    """(caption bytes, image bytes, expected outcome, expected repair or None)."""
    rgb = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
    good = png(rgb)
    palette = Image.fromarray(rgb).convert("P")
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)
    cases = [
        (b"a red circle", good, OK, None),
        (b"a red circle", good[: len(good) // 2], "corrupt_image", None),
        (b"a red circle", rng.bytes(300), "corrupt_image", None),
        (b"a red circle", b"", "empty_image_bytes", None),
        (b"a grey circle", png(rgb[..., 0]), OK, "grayscale_to_rgb"),
        (b"a deep grey circle", png((rgb[..., 0].astype(np.uint16) * 257)), OK,
         "grayscale_to_rgb"),
        (b"a see-through circle", png(rgb, "RGBA"), OK, "alpha_to_rgb"),
        (b"a palette circle", png(rgb, "P"), OK, "palette_to_rgb"),
        (b"a transparent palette circle", buf.getvalue(), OK, "palette_to_rgb"),
        (b"a printed circle", png(rgb, "CMYK", fmt="JPEG"), OK, "cmyk_to_rgb"),
        (b"caf\xe9 circle \xff", good, OK, "non_utf8_text"),
        (b"", good, "empty_caption", None),
        (b"  \n\t ", good, "empty_caption", None),
        (" ".join(["circle"] * 400).encode(), good, "too_long_with_image", None),
    ]
    # Random corruption of a valid file: any outcome is fine, but it must be counted.
    for _ in range(40):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), int(rng.integers(1, 20))):
            data[pos] = int(rng.integers(0, 256))
        cases.append((b"a mutated circle", bytes(data), None, None))
    return cases


def make_config(tmp_path, source, data_dir):
    c = example_config.get_config()
    c.data.tokenizer_cache_dir = str(tmp_path / "tok")
    c.data.source, c.data.data_dir = source, data_dir
    c.data.text_source = "none"
    c.data.multi_image_fraction = 0.0  # one record per document: exact accounting
    c.data.eval_examples = 0
    c.data.shuffle = False
    return c


def write_folder(tmp_path, cases):
    lines = []
    for i, (caption, image, _, _) in enumerate(cases):
        (tmp_path / f"{i}.img").write_bytes(image)
        lines.append(json.dumps({"file": f"{i}.img",
                                 "caption": caption.decode("latin-1")}).encode())
    # Folder-only defects: a line that is not JSON, one without "file", a missing file.
    lines += [b"{not json", json.dumps({"caption": "x"}).encode(),
              json.dumps({"file": "absent.png", "caption": "gone"}).encode()]
    (tmp_path / CAPTIONS_FILE).write_bytes(b"\n".join(lines))
    extra = [(None, None, "bad_metadata_line", None), (None, None, "bad_metadata_line", None),
             (None, None, "missing_image_file", None)]
    return str(tmp_path), list(cases) + extra


def write_array_record(tmp_path, cases):
    path = str(tmp_path / "fuzz.array_record")
    write_array_records(path, [(c, i) for c, i, _, _ in cases])
    # Records too short for the header, and a header longer than the record.
    from array_record.python import array_record_module
    broken = str(tmp_path / "fuzz_broken.array_record")
    writer = array_record_module.ArrayRecordWriter(broken, "group_size:1")
    writer.write(b"\x01")
    writer.write(b"\xff\xff\x00\x00abc")
    writer.close()
    extra = [(None, None, "unreadable_record", None)] * 2
    return str(tmp_path / "fuzz*.array_record"), list(cases) + extra


@pytest.mark.parametrize("source, writer", [("folder", write_folder),
                                            ("array_record", write_array_record)])
def test_fuzzed_records_are_all_accounted_for(tmp_path, source, writer):
    rng = np.random.default_rng(0)
    data_dir, cases = writer(tmp_path, labelled_records(rng))
    if source == "folder":  # the folder source reads captions as JSON strings
        cases = [(c.decode("latin-1").encode() if c is not None else c, i, o, r)
                 if r != "non_utf8_text" else (c, i, OK, None) for c, i, o, r in cases]
    config = make_config(tmp_path, source, data_dir)
    records = sources.image_source(config.data, "train")
    assert len(records) == len(cases)
    builder = DocumentBuilder(build_tokenizer(config), DocumentOptions.from_config(config))
    spec = batch_spec(config)
    packer = PackingIterDataset(image_documents(records, builder), spec, 0)
    counts = collections.Counter()
    for batch in packer:  # one epoch, to exhaustion
        counts.update(batch.pop(STATS_KEY))
        validate_batch(batch, spec, 0)
    stats = PipelineStats.from_counts(counts)
    assert stats.records_seen == len(cases)
    expected = collections.Counter(o for _, _, o, _ in cases if o not in (None, OK))
    unlabelled_skips = sum(o is None for _, _, o, _ in cases)
    for reason, n in expected.items():
        assert stats.skipped.get(reason, 0) >= n, reason
    assert sum(stats.skipped.values()) <= sum(expected.values()) + unlabelled_skips
    assert stats.documents >= sum(o == OK for _, _, o, _ in cases)
    repairs = collections.Counter(r for _, _, o, r in cases if r)
    for repair, n in repairs.items():
        assert stats.repaired.get(repair, 0) >= n, repair


def test_training_iterator_survives_bad_folder(tmp_path):
    data_dir, _ = write_folder(tmp_path, labelled_records(np.random.default_rng(1)))
    config = make_config(tmp_path, "folder", data_dir)
    config.data.shuffle = True
    it = make_train_iterator(config)
    for _ in range(4):
        validate_batch(next(it), it.spec, it.pad_id)
    assert sum(it.stats().skipped.values()) > 0
