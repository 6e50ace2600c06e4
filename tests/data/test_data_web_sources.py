"""The sharded web sources (webdataset, parquet, interleaved, streaming text) and
mixtures: exact skip counts against the shards' ground truth, block order, sharding,
resume, remote paths, start-up checks."""
import collections
import json
import pathlib

import fsspec
import numpy as np
import pytest

from data_pipelines import (example_config, make_eval_iterator, make_train_iterator,
                            validate_data_config)
from data_pipelines.shards import BlockShuffledStream, ShardedRecords, ShardedView
from data_pipelines.web_sources import (interleaved_records, parquet_records, text_records,
                                        webdataset_records)
from tests.helpers import web_shards
from tfusion.batch import validate_batch
from tfusion.config import ConfigError

BLOCK = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Every format, with faults; {name: (glob, per-record outcomes)}."""
    root = tmp_path_factory.mktemp("web")
    out = {}
    wds = root / "wds"
    wds.mkdir()
    outcomes = web_shards.write_webdataset(wds)
    kept = web_shards.write_truncated_tar(wds / "00003.tar")
    (wds / "00004.tar").write_bytes(b"not a tar file" * 64)
    out["webdataset"] = (f"{wds}/*.tar", outcomes + [""] * kept)
    for name, writer in (("parquet", web_shards.write_parquet),
                         ("interleaved", web_shards.write_interleaved),
                         ("text", web_shards.write_text_shards)):
        (root / name).mkdir()
        out[name] = (f"{root / name}/*", writer(root / name))
    (root / "jsonl").mkdir()
    out["interleaved_jsonl"] = (f"{root / 'jsonl'}/*.jsonl",
                                web_shards.write_interleaved(root / "jsonl", as_jsonl=True))
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def _records(kind, pattern, block=BLOCK) -> ShardedView:
    if kind == "webdataset":
        return webdataset_records(pattern, "caption", block)
    if kind == "parquet":
        return parquet_records(pattern, "image", "caption", block)
    if kind.startswith("interleaved"):
        return interleaved_records(pattern, "texts", "images", block)
    return text_records(pattern, "text", block)


def _config(tok_dir, source, pattern, **data):
    c = example_config.get_config()
    c.data.tokenizer_cache_dir = tok_dir
    c.data.shuffle_block = BLOCK
    c.data.eval_examples = 2
    if source == "text":
        c.data.source, c.data.text_source, c.data.text_files = "none", "files", pattern
    else:
        c.data.source, c.data.data_dir, c.data.text_source = source, pattern, "none"
    for key, value in data.items():
        c.data[key] = value
    return c


def test_shard_problems_are_named_and_whole_samples_kept(shards):
    pattern, outcomes = shards["webdataset"]
    records = _records("webdataset", pattern)
    assert [name for name, _ in records.base.unreadable_shards] == ["00004.tar"]
    assert [name for name, _ in records.base.truncated_shards] == ["00003.tar"]
    assert len(records) == len(outcomes)  # 3 x 8 whole shards + the cut one's whole samples
    # Read-time faults are error records; decode-time ones (corrupt bytes) are not yet.
    read_faults = {"missing_caption", "missing_image_member", "bad_metadata_json"}
    assert [r.error for r in records] == [o if o in read_faults else "" for o in outcomes]
    assert records[5].caption == web_shards.scene(5)[1]  # the caption of a .json member
    assert records[0].origin == "00000.tar sample 000000000"


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "interleaved",
                                  "interleaved_jsonl", "text"])
def test_skip_counts_exact_through_the_pipeline(shards, tok_dir, kind):
    """Unshuffled, one stream: packer document p is train record (p mod E) mod n, E the
    epoch's ceil(n / block) * block positions (the last block wraps to the start), so
    the skips of the first R records read are known exactly."""
    pattern, outcomes = shards[kind]
    source = "interleaved" if kind.startswith("interleaved") else kind
    c = _config(tok_dir, source, pattern, shuffle=False, multi_image_fraction=0.0)
    validate_data_config(c)
    it = make_train_iterator(c)
    batches = [next(it) for _ in range(6)]
    for b in batches:
        validate_batch(b, it.spec, it.pad_id)
    counts = it.data_counts()
    read = counts["data_records_read"]
    train = outcomes[c.data.eval_examples:]
    name = "text" if kind == "text" else "image"
    epoch = -(-len(train) // BLOCK) * BLOCK
    seen = collections.Counter(train[p % epoch % len(train)] for p in range(read))
    expected = {f"data_skipped_{reason}": n for reason, n in seen.items() if reason}
    assert {k: v for k, v in counts.items() if k.startswith("data_skipped_")} == expected
    assert counts[f"data_{name}_records_read"] == read
    assert read >= len(train)  # a whole epoch read: every fault counted at least once
    if kind == "webdataset":
        assert counts["data_image_unreadable_shards"] == 1
        assert counts["data_image_truncated_shards"] == 1


def test_interleaved_documents_keep_reading_order(shards, tok_dir):
    from data_pipelines.tokenizer import build_tokenizer

    pattern, _ = shards["interleaved"]
    c = _config(tok_dir, "interleaved", pattern, shuffle=False)
    it = make_train_iterator(c)
    b = next(it)
    tok, patches = build_tokenizer(c), it.spec.patches_per_image
    images_per_doc = []
    for r in range(b["tokens"].shape[0]):
        seg = b["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            index, tokens = b["image_index"][r][seg == s], b["tokens"][r][seg == s]
            slots = sorted({int(i) // patches for i in index if i >= 0})
            images_per_doc.append(len(slots))
            # text, then each image between BOI and EOI with its caption after it
            boi = np.flatnonzero(tokens == tok.boi_id)
            assert len(boi) == len(slots) and boi[0] > 1
            for start in boi:
                assert np.all(index[start + 1:start + 1 + patches] >= 0)
                assert tokens[start + 1 + patches] == tok.eoi_id
    assert set(images_per_doc) == {1, 2}
    assert np.all(b["image_t_max"][b["image_mask"]] == c.diffusion.num_train_steps - 1)


def test_block_order_is_an_epoch_permutation_and_shards_partition_it(shards):
    pattern, outcomes = shards["parquet"]
    view = _records("parquet", pattern, block=5)  # 20 records = 4 blocks of 5
    stream = BlockShuffledStream(view, seed=3, shuffle=True)
    epoch = [stream.record_at(p) for p in range(20)]
    assert sorted(epoch) == list(range(20)) and epoch != list(range(20))
    for q in range(4):  # each run of 5 positions walks one aligned block
        assert len({r // 5 for r in epoch[5 * q:5 * q + 5]}) == 1
    next_epoch = [stream.record_at(p) for p in range(20, 40)]
    assert sorted(next_epoch) == list(range(20)) and next_epoch != epoch
    # Shards: disjoint blocks, together the epoch; a shard of a shard composes.
    halves = [stream.shard(k, 2) for k in range(2)]
    got = [[h[i].origin for i in range(10)] for h in halves]
    assert not set(got[0]) & set(got[1])
    assert sorted(got[0] + got[1]) == sorted(view[i].origin for i in range(20))
    quarter = halves[1].shard(1, 2)  # blocks 1 + 2 * 1 = 3 of 4
    assert [quarter[i].origin for i in range(5)] == [stream.shard(3, 4)[i].origin
                                                     for i in range(5)]


def test_a_short_last_block_wraps_to_the_start(shards):
    pattern, _ = shards["text"]
    view = _records("text", pattern, block=7)  # 30 records: 5 blocks, the last wraps
    stream = BlockShuffledStream(view, seed=0, shuffle=False)
    assert [stream.record_at(p) for p in range(35)] == [p % 30 for p in range(35)]
    shuffled = BlockShuffledStream(view, seed=0, shuffle=True)
    epoch = collections.Counter(shuffled.record_at(p) for p in range(35))
    assert set(epoch) == set(range(30)) and sum(n - 1 for n in epoch.values()) == 5


@pytest.mark.parametrize("mixture", [False, True])
def test_resume_is_exact(shards, tok_dir, mixture):
    c = _config(tok_dir, "webdataset", shards["webdataset"][0], text_source="captions")
    if mixture:
        c.data.mixture = _mixture_json(shards)
    validate_data_config(c)
    it = make_train_iterator(c)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = make_train_iterator(c)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert resumed.data_counts() == it.data_counts()


def _mixture_json(shards, weights=(0.4, 0.2, 0.1, 0.3)):
    entries = [{"name": "web", "source": "webdataset", "data_dir": shards["webdataset"][0]},
               {"name": "hf", "source": "parquet", "data_dir": shards["parquet"][0]},
               {"name": "docs", "source": "interleaved", "data_dir": shards["interleaved"][0]},
               {"name": "corpus", "source": "text", "data_dir": shards["text"][0],
                "eval_examples": 1}]
    for entry, w in zip(entries, weights):
        entry["weight"] = w
    return json.dumps(entries)


def test_mixture_counts_per_source_and_eval_split(shards, tok_dir):
    c = _config(tok_dir, "webdataset", shards["webdataset"][0])
    c.data.mixture = _mixture_json(shards)
    validate_data_config(c)
    it = make_train_iterator(c)
    for _ in range(8):
        next(it)
    counts = it.data_counts()
    names = ("web", "hf", "docs", "corpus")
    assert sum(counts[f"data_{n}_records_read"] for n in names) == counts["data_records_read"]
    assert all(counts[f"data_{n}_records_read"] > 0 for n in names)
    for key, value in counts.items():  # every skip is attributed to its source
        if key.startswith("data_skipped_"):
            reason = key[len("data_skipped_"):]
            assert value == sum(counts.get(f"data_{n}_skipped_{reason}", 0) for n in names)
    assert counts["data_web_unreadable_shards"] == 1
    assert set(it.mixture_weights) == set(names)
    eval_batches = list(make_eval_iterator(c))
    assert len(eval_batches) == c.data.eval_batches


@pytest.mark.parametrize("mixture, field", [
    ('[{"name": "a", "source": "nope", "data_dir": "x", "weight": 1}]', "data.mixture[0]"),
    ('[{"name": "a", "source": "text", "weight": 1}]', "data.mixture[0].data_dir"),
    ('[{"name": "a", "source": "text", "data_dir": "D", "weight": 1},'
     ' {"name": "a", "source": "text", "data_dir": "D", "weight": 1}]', "data.mixture[1].name"),
    ('[{"name": "a", "source": "text", "data_dir": "D", "weight": 1, "colour": 3}]',
     "data.mixture[0].colour"),
    ('[{"name": "a", "source": "webdataset", "data_dir": "/nowhere/*.tar", "weight": 1}]',
     "data.mixture[0]"),
    ('{"name": "a"}', "data.mixture"),
])
def test_bad_mixtures_fail_at_start_up_naming_the_field(shards, tok_dir, mixture, field):
    c = _config(tok_dir, "webdataset", shards["webdataset"][0])
    c.data.mixture = mixture.replace("D", shards["text"][0])
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        validate_data_config(c)


def test_interleaved_has_no_captions_to_read_as_text(shards, tok_dir):
    c = _config(tok_dir, "interleaved", shards["interleaved"][0], text_source="captions")
    with pytest.raises(ConfigError, match=r"data\.text_source"):
        validate_data_config(c)


def test_console_summary_names_each_source(shards, tok_dir):
    from tfusion.train.metrics import data_summary

    c = _config(tok_dir, "webdataset", shards["webdataset"][0])
    c.data.mixture = _mixture_json(shards)
    it = make_train_iterator(c)
    next(it)
    counts = it.data_counts()
    line = data_summary(counts)
    for name in ("web", "hf", "docs", "corpus"):
        read = counts[f"data_{name}_records_read"]
        assert f"{name} {read:,} read" in line
    assert "web" in line and "1 shard unreadable, 1 shard truncated" in line


def test_missing_shards_fail_at_start_up(tok_dir, tmp_path):
    c = _config(tok_dir, "parquet", str(tmp_path / "*.parquet"))
    with pytest.raises(ConfigError, match=r"data\.data_dir.*no files match"):
        validate_data_config(c)
    c = _config(tok_dir, "text", str(tmp_path / "*.jsonl"))
    with pytest.raises(ConfigError, match=r"data\.text_files"):
        validate_data_config(c)


def test_remote_filesystem_gives_the_same_batches(shards, tok_dir):
    """fsspec's memory:// stands in for object storage: the same shards give the
    same batches as on local disk."""
    fs = fsspec.filesystem("memory")
    for kind in ("webdataset", "text"):
        for path in sorted(pathlib.Path(shards[kind][0]).parent.glob(
                "*.tar" if kind == "webdataset" else "*")):
            fs.pipe(f"/remote/{kind}/{path.name}", path.read_bytes())
    local = _config(tok_dir, "webdataset", shards["webdataset"][0], text_source="files",
                    text_files=shards["text"][0])
    remote = _config(tok_dir, "webdataset", "memory://remote/webdataset/*.tar",
                     text_source="files", text_files="memory://remote/text/*")
    validate_data_config(remote)
    a, b = make_train_iterator(local), make_train_iterator(remote)
    for _ in range(3):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert a.data_counts() == b.data_counts()


def test_index_is_small(shards):
    records = _records("text", shards["text"][0])
    assert isinstance(records.base, ShardedRecords)
    # A position per 16 records and a start per shard: bytes, not the corpus.
    assert records.base.index_bytes() <= 8 * (len(records) // 16 + 3 + 4 + 1) + 64


def test_image_folder_reads_from_a_remote_filesystem(tok_dir, tmp_path):
    from tests.helpers.data_fixtures import CORRUPT, data_config_for, write_folder

    local = write_folder(tmp_path, corrupt=CORRUPT)
    fs = fsspec.filesystem("memory")
    for path in tmp_path.iterdir():
        fs.pipe(f"/folder/{path.name}", path.read_bytes())
    a = make_train_iterator(data_config_for(tok_dir, local))
    remote = data_config_for(tok_dir, "memory://folder")
    validate_data_config(remote)
    b = make_train_iterator(remote)
    for _ in range(2):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert a.data_counts() == b.data_counts() and b.data_counts()["data_skipped_corrupt_image"]


def test_pre_tokenized_array_record_text(tok_dir, tmp_path):
    """Token-id documents in .array_record shards pack as BOS ids EOS, the same rows as
    the texts they came from; bad records are counted."""
    from array_record.python import array_record_module

    from data_pipelines.tokenizer import build_tokenizer
    from data_pipelines.web_sources import write_token_shard

    texts = [web_shards.scene(7000 + i)[1] for i in range(24)]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("\n".join(texts) + "\n")
    c = _config(tok_dir, "text", str(tmp_path / "plain" / "*.txt"), shuffle=False)
    tok = build_tokenizer(c)
    (tmp_path / "ids").mkdir()
    write_token_shard(str(tmp_path / "ids" / "a.array_record"), [tok.encode(t) for t in texts])
    pre = _config(tok_dir, "text", str(tmp_path / "ids" / "*.array_record"), shuffle=False)
    validate_data_config(pre)
    a, b = make_train_iterator(c), make_train_iterator(pre)
    for _ in range(2):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    writer = array_record_module.ArrayRecordWriter(str(tmp_path / "ids" / "b.array_record"),
                                                   "group_size:1")
    writer.write(b"plain bytes, no magic")
    writer.close()
    write_token_shard(str(tmp_path / "ids" / "c.array_record"), [[5, tok.vocab_size + 3]])
    records = text_records(str(tmp_path / "ids" / "*.array_record"), "text", BLOCK)
    assert len(records) == 26 and records[24].error == "bad_token_record"
    mixed = _config(tok_dir, "text", str(tmp_path / "ids" / "*.array_record"), shuffle=False,
                    eval_examples=0)
    it = make_train_iterator(mixed)
    for _ in range(3):
        next(it)
    counts = it.data_counts()
    assert counts["data_skipped_bad_token_record"] >= 1
    assert counts["data_skipped_token_id_out_of_range"] >= 1


def test_small_splits_still_give_each_reader_distinct_records(shards):
    pattern, _ = shards["parquet"]
    view = _records("parquet", pattern, block=16).split(0, 8)  # 8 records, one 16-block
    stream = BlockShuffledStream(view, seed=0, shuffle=False)
    readers = [stream.shard(k, 4) for k in range(4)]
    got = [[r[i].origin for i in range(2)] for r in readers]
    assert sorted(sum(got, [])) == sorted(view[i].origin for i in range(8))


def test_each_local_shard_is_indexed_once_per_process(tok_dir, tmp_path, monkeypatch):
    """Images and their captions, the train and the eval split read the same tars:
    one header pass per shard; a rewritten shard (new size / mtime) is indexed again."""
    from data_pipelines import shards as shards_module

    (tmp_path / "wds").mkdir()
    web_shards.write_webdataset(tmp_path / "wds", shards=2, per_shard=8, faults={})
    calls = collections.Counter()
    index = shards_module.TarFormat.index

    def counting(self, path):
        calls[path] += 1
        return index(self, path)

    monkeypatch.setattr(shards_module.TarFormat, "index", counting)
    c = _config(tok_dir, "webdataset", str(tmp_path / "wds" / "*.tar"), text_source="captions")
    next(make_train_iterator(c))
    next(make_eval_iterator(c))
    assert sorted(calls.values()) == [1, 1]
    web_shards.write_webdataset(tmp_path / "wds", shards=1, per_shard=9, faults={})
    records = _records("webdataset", str(tmp_path / "wds" / "*.tar"))
    assert calls[str(tmp_path / "wds" / "00000.tar")] == 2 and len(records) == 9 + 8
