"""The Chameleon-style data path: images become VQ code tokens inside the text."""
import numpy as np
import pytest
from flax import nnx

from data_pipelines import make_train_iterator, pipeline_stats, sources, validate_data_config
from data_pipelines.documents import DocumentBuilder, DocumentOptions
from data_pipelines.images import prepare_image
from data_pipelines.records import ImageCaptionRecord
from data_pipelines.tokenizer import build_tokenizer
from experiments import registry
from tfusion.autoencoders import AutoencoderConfig, VQModel, jit_method, save_pretrained
from tfusion.batch import validate_batch
from tfusion.config import ConfigError, image_token_offset

# f4 (three blocks): a 16 px image -> 4 x 4 codes, as the micro Chameleon runs expect.
TINY_VQ = AutoencoderConfig(block_out_channels=(8, 16, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, num_vq_embeddings=256)


@pytest.fixture(scope="module")
def vq_model(tmp_path_factory):
    model = VQModel(TINY_VQ, rngs=nnx.Rngs(3))
    path = str(tmp_path_factory.mktemp("vq"))
    save_pretrained(model, path)
    return model, path


@pytest.fixture()
def config(vq_model, tmp_path):
    c = registry.get_config("micro_chameleon_w64")
    c.data.update(encoder_path=vq_model[1], tokenizer_cache_dir=str(tmp_path))
    c.train.batch_size = 4
    return c


def test_image_document_holds_the_vq_codes_as_tokens(config, vq_model):
    validate_data_config(config)
    tok = build_tokenizer(config)
    builder = DocumentBuilder(tok, DocumentOptions.from_config(config))
    records = sources.image_source(config.data, "train")
    encode_ids = jit_method(vq_model[0], "encode_ids")
    offset = image_token_offset(config.model)
    assert offset >= tok.vocab_size  # codes follow the text vocabulary (BOI/EOI included)
    orders = set()
    for i in range(12):
        record = records[i]
        doc = builder.image_document(i, record, records).document
        assert len(doc) == 1 and doc[0].dtype == np.int32  # one token array: no image slots
        ids = doc[0].tolist()
        pixels, _ = prepare_image(record.image, config.data.image_size)
        codes = np.asarray(encode_ids(pixels[None]))[0].reshape(-1)
        assert ids.count(tok.boi_id) == 1 and ids.count(tok.eoi_id) == 1
        b = ids.index(tok.boi_id)
        assert ids[b + 1:b + 1 + 16] == (codes + offset).tolist()
        assert ids[b + 17] == tok.eoi_id
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        caption = tok.encode(record.caption)
        text = ids[1:b] + ids[b + 18:-1]
        assert text in (caption, [])  # caption before or after the image, or dropped (CFG)
        assert max(ids[:b + 1] + ids[b + 17:]) < offset  # codes only between BOI and EOI
        orders.add("before" if ids[1:b] else "after" if text else "dropped")
    assert {"before", "after"} <= orders


@pytest.mark.parametrize("latent, reason", [
    (np.full((4, 4, 1), 256, np.int32), "vq_code_out_of_range"),
    (np.full((4, 4, 1), -1, np.int32), "vq_code_out_of_range"),
    (np.zeros((4, 4, 1), np.float32), "vq_codes_not_integer"),
])
def test_bad_codes_are_skipped_with_a_reason(config, latent, reason):
    builder = DocumentBuilder(build_tokenizer(config), DocumentOptions.from_config(config))
    record = ImageCaptionRecord(image=None, caption="a red circle", latent=latent)
    item = builder.image_document(0, record, [record])
    assert item.document is None and item.skip_reason == reason


def _code_runs(row_tokens, row_segments, offset):
    """(start, end) of each maximal run of code tokens within one segment."""
    runs, start = [], None
    for i, token in enumerate(row_tokens):
        inside = token >= offset and (start is None or row_segments[i] == row_segments[start])
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            runs.append((start, i))
            start = i if token >= offset else None
    if start is not None:
        runs.append((start, len(row_tokens)))
    return runs


def test_packed_batches_carry_whole_images_as_tokens_and_no_slots(config):
    it = make_train_iterator(config)
    tok = build_tokenizer(config)
    offset = image_token_offset(config.model)
    whole = 0
    for _ in range(4):
        batch = next(it)
        validate_batch(batch, it.spec, it.pad_id)
        assert batch["images"].shape[1] == 0 and (batch["image_index"] < 0).all()
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
            for start, end in _code_runs(tokens, segments, offset):
                cut = (start == 0 or segments[start - 1] != segments[start]
                       or end == len(tokens) or segments[end] != segments[start])
                if cut:  # a document split by the packer to fill a row (as text is)
                    continue
                assert end - start == 16
                assert tokens[start - 1] == tok.boi_id and tokens[end] == tok.eoi_id
                whole += 1
    assert whole >= 20
    assert pipeline_stats(it).skipped == {}


def test_discrete_config_errors_name_the_field(config):
    cases = [(dict(encoder="identity"), "data.encoder"),
             (dict(image_size=32), "data.image_size"),  # 8 x 8 codes, model wants 16
             (dict(max_images_per_row=1), "data.max_images_per_row")]
    for update, field in cases:
        bad = config.copy_and_resolve_references()
        bad.data.update(update)
        with pytest.raises(ConfigError, match=field):
            validate_data_config(bad)
    crowded = config.copy_and_resolve_references()
    crowded.model.codebook_size = crowded.model.vocab_size - 100  # codes over text ids
    with pytest.raises(ConfigError, match="data.tokenizer"):
        validate_data_config(crowded)


def test_micro_chameleon_trains_on_its_data_with_split_text_and_image_losses(config, tmp_path):
    from tfusion.scaling.collect import read_rows
    from launch.train_setup import train

    config.train.update(steps=3, log_every=1, eval_every=3, checkpoint_every=3, batch_size=8)
    config.data.eval_batches = 1
    train(config, str(tmp_path / "run"))
    rows = read_rows(str(tmp_path / "run"))
    final_eval = [r for r in rows if r["split"] == "eval"][-1]
    for key in ("loss_text", "loss_image_tokens", "loss_lm"):
        assert np.isfinite(final_eval[key]), key
    # loss_lm averages the two over their target counts, so it lies between them.
    lo, hi = sorted((final_eval["loss_text"], final_eval["loss_image_tokens"]))
    assert lo - 1e-6 <= final_eval["loss_lm"] <= hi + 1e-6
    assert final_eval["loss_diffusion"] == 0.0
