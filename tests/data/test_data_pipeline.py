"""make_train_iterator / make_eval_iterator: contract, determinism, resume, sharding."""
import json

import numpy as np
import pytest

from data_pipelines import (example_config, make_eval_iterator, make_train_iterator,
                            pipeline_stats, validate_data_config)
from tfusion.batch import validate_batch
from tfusion.config import ConfigError


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = example_config.get_config()
    c.data.tokenizer_cache_dir = str(tmp_path_factory.mktemp("tok"))
    return c


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_satisfy_the_contract_and_pack_densely(config):
    validate_data_config(config)
    it = make_train_iterator(config)
    batches = take(it, 12)
    for b in batches:
        validate_batch(b, it.spec, it.pad_id)
        assert b["tokens"].shape == (config.train.batch_size, config.data.seq_len)
    stats = pipeline_stats(it)
    assert stats.batches == 12 and stats.skipped == {}
    assert stats.packing_efficiency >= 0.98
    assert stats.nonpad_tokens == sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert stats.images == sum(int(b["image_mask"].sum()) for b in batches)
    # Noise limiting: image-first documents (about 20%) carry t_max = noise_limit_t.
    t_max = np.concatenate([b["image_t_max"][b["image_mask"]] for b in batches])
    assert set(np.unique(t_max)) <= {config.diffusion.noise_limit_t,
                                     config.diffusion.num_train_steps - 1}
    assert 0.05 < np.mean(t_max == config.diffusion.noise_limit_t) < 0.45


def test_same_config_same_batches_and_seed_changes_them(config):
    assert_same_batches(take(make_train_iterator(config), 3), take(make_train_iterator(config), 3))
    other = config.copy_and_resolve_references()
    other.train.seed = 1
    a, b = next(make_train_iterator(config)), next(make_train_iterator(other))
    assert not np.array_equal(a["tokens"], b["tokens"])


@pytest.mark.parametrize("k", [0, 5])
def test_resume_in_process(config, k):
    it = make_train_iterator(config)
    take(it, k + 1)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 4)
    resumed = make_train_iterator(config)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 4), expected)
    assert pipeline_stats(resumed) == pipeline_stats(it)


def test_resume_with_worker_processes(config):
    c = config.copy_and_resolve_references()
    c.data.num_workers = 2
    it = make_train_iterator(c)
    try:
        take(it, 3)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 3)
    finally:
        it.close()
    resumed = make_train_iterator(c)
    try:
        resumed.set_state(state)
        got = take(resumed, 3)
    finally:
        resumed.close()
    assert_same_batches(got, expected)
    for b in got:
        validate_batch(b, resumed.spec, resumed.pad_id)


def test_processes_get_disjoint_shards_of_local_batch_size(config):
    def first_tokens_per_doc(batches):
        docs = set()
        for b in batches:
            for r in range(b["tokens"].shape[0]):
                seg = b["segment_ids"][r]
                docs |= {tuple(b["tokens"][r][seg == s][:40]) for s in np.unique(seg[seg > 0])}
        return docs

    shards = []
    for p in range(2):
        it = make_train_iterator(config, process_index=p, process_count=2)
        batches = take(it, 3)
        assert batches[0]["tokens"].shape[0] == config.train.batch_size // 2
        shards.append(batches)
    # Rendered image documents are near-unique, so their latents identify them.
    latents = [{b["images"][r, m].tobytes() for b in s for r, m in zip(*np.nonzero(b["image_mask"]))}
               for s in shards]
    assert latents[0] and latents[1] and not latents[0] & latents[1]
    assert first_tokens_per_doc(shards[0]) != first_tokens_per_doc(shards[1])


def test_eval_iterator_is_finite_fixed_and_held_out(config):
    a, b = list(make_eval_iterator(config)), list(make_eval_iterator(config))
    assert len(a) == config.data.eval_batches
    assert_same_batches(a, b)
    train_images = {x.tobytes() for bt in take(make_train_iterator(config), 10)
                    for x in bt["images"][bt["image_mask"]]}
    eval_images = {x.tobytes() for bt in a for x in bt["images"][bt["image_mask"]]}
    assert eval_images and len(eval_images & train_images) < len(eval_images) // 4


@pytest.mark.parametrize("field, value, match", [
    ("data.image_size", 32, "data.image_size"),
    ("data.seq_len", 40, "data.seq_len"),
    ("data.source", "nope", "data.source"),
    ("data.text_token_share", 1.5, "data.text_token_share"),
    ("model.vocab_size", 100, "data.tokenizer"),
    ("data.max_images_per_document", 9, "data.max_images_per_document"),
])
def test_validation_names_the_field(config, field, value, match):
    c = config.copy_and_resolve_references()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        validate_data_config(c)


def test_digits_source_builds_valid_batches(config):
    c = config.copy_and_resolve_references()
    c.data.source = "digits"
    c.data.multi_image_fraction = 0.0
    validate_data_config(c)
    it = make_train_iterator(c)
    for b in take(it, 3):
        validate_batch(b, it.spec, it.pad_id)
    assert pipeline_stats(it).images > 0


def test_text_only_training_from_txt_and_jsonl_files(config, tmp_path):
    (tmp_path / "a.txt").write_bytes(b"first document here\n\nsecond \xff document\n" +
                                     b" ".join([b"long"] * 700) + b"\n")
    (tmp_path / "b.jsonl").write_text('{"text": "a json document"}\n{"oops": 1}\nnot json\n'
                                      '{"text": "   "}\n')
    c = config.copy_and_resolve_references()
    c.data.source, c.data.text_source = "none", "files"
    c.data.text_files = str(tmp_path / "*")
    c.data.eval_examples = 1
    validate_data_config(c)
    it = make_train_iterator(c)
    batches = take(it, 6)
    for b in batches:
        validate_batch(b, it.spec, it.pad_id)
        assert b["images"].shape[1] == 0 and (b["image_index"] == -1).all()
    stats = pipeline_stats(it)
    assert stats.skipped["bad_metadata_line"] >= 2 and stats.skipped["empty_text"] >= 1
    assert stats.repaired["non_utf8_text"] >= 1
    assert stats.split_text_documents >= 1  # the 700-word line is longer than a row
