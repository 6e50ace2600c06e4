"""The shapes_edit set, edit documents, the edit folder layout and their config checks."""
import json

import numpy as np
import pytest
from PIL import Image

from data_pipelines.file_sources import edit_folder_records
from data_pipelines.pipeline import make_train_iterator
from data_pipelines.shapes_edit import EDIT_KINDS, is_heldout, make_edit
from experiments import registry
from tests.helpers.edit_reference import apply_instruction as _apply
from tfusion.batch import CONDITION
from tfusion.config import ConfigError


def test_edits_follow_their_instructions_and_hold_out_instructions():
    seen = {kind: set() for kind in EDIT_KINDS}
    for split in ("train", "eval"):
        for i in range(300):
            e = make_edit(split, i)
            assert e.kind == EDIT_KINDS[i % 5]
            target = {(s.shape, s.color, s.size, s.row, s.col) for s in e.target.shapes}
            assert _apply(e.instruction, e.source) == target, e.instruction
            assert target != {(s.shape, s.color, s.size, s.row, s.col) for s in e.source.shapes}
            assert 1 <= len(e.target.shapes) <= 3 and 1 <= len(e.source.shapes) <= 3
            assert len({s.color for s in e.target.shapes}) == len(e.target.shapes)
            assert is_heldout(e.instruction) == (split == "eval")
            if split == "eval":
                seen[e.kind].add(e.instruction)
    assert all(len(v) >= 3 for v in seen.values()), {k: len(v) for k, v in seen.items()}
    assert make_edit("eval", 7) == make_edit("eval", 7)


def _edit_config(**data):
    c = registry.get_config("shapes_edit_tiny")
    c.train.init_from = ""
    c.train.batch_size = 4
    c.data.update(**data)
    return c


def test_pipeline_packs_edit_documents_with_a_condition_input():
    config = _edit_config(edit_fraction=0.5)
    it = make_train_iterator(config)
    t_max, images = [], 0
    for _ in range(6):
        batch = next(it)
        mask = batch["image_mask"]
        t_max += batch["image_t_max"][mask].tolist()
        images += int(mask.sum())
    conditions = t_max.count(CONDITION)
    # Each condition image is followed in its document by a diffused output image.
    assert conditions > 0 and images - conditions >= conditions
    assert it.data_counts()["data_records_read"] > 0


def test_edit_folder_reads_layout_and_counts_bad_lines(tmp_path):
    red = np.zeros((16, 16, 3), np.uint8)
    red[4:12, 4:12] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "in.png")
    Image.fromarray(red[:, ::-1]).save(tmp_path / "out.png")
    lines = [json.dumps({"input": "in.png", "instruction": "flip it", "output": "out.png"}),
             json.dumps({"input": "in.png", "instruction": "x", "output": "gone.png"}),
             "not json",
             json.dumps({"input": "in.png", "output": "out.png"})]
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    records = edit_folder_records(str(tmp_path))
    assert len(records) == 4
    assert records[0].error == "" and records[0].instruction == "flip it"
    assert [r.error for r in records][1:] == ["missing_image_file", "bad_metadata_line",
                                             "bad_metadata_line"]
    config = _edit_config(eval_examples=0)
    config.data.update(source="edit_folder", data_dir=str(tmp_path), text_source="none")
    config.train.final_eval_suite = ""
    from data_pipelines.config import validate_data_config
    validate_data_config(config)
    it = make_train_iterator(config)
    batch = next(it)
    assert (batch["image_t_max"][batch["image_mask"]] == CONDITION).any()
    counts = it.data_counts()
    assert counts.get("data_skipped_missing_image_file", 0) > 0, counts
    assert counts.get("data_skipped_bad_metadata_line", 0) > 0, counts


def test_edit_configs_fail_at_start_up_naming_the_field(tmp_path):
    from data_pipelines.config import validate_data_config
    from tfusion.train.validate import validate_train_config

    with pytest.raises(ConfigError, match="data.multi_image_fraction"):
        validate_data_config(_edit_config(multi_image_fraction=0.1))
    with pytest.raises(ConfigError, match="data.max_images_per_row"):
        validate_data_config(_edit_config(max_images_per_row=1))
    with pytest.raises(ConfigError, match="data.data_dir"):
        validate_data_config(_edit_config(source="edit_folder", data_dir=str(tmp_path),
                                          text_source="none"))
    with pytest.raises(ConfigError, match="data.text_source"):
        validate_data_config(_edit_config(source="edit_folder", data_dir=str(tmp_path)))
    # A suite that cannot read the data is refused before step 0, not after the last.
    folder = registry.get_config("shapes_tiny")
    folder.data.update(source="folder", data_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="train.final_eval_suite"):
        validate_train_config(folder)
    plain = registry.get_config("shapes_tiny")
    plain.train.final_eval_suite = "edit"
    with pytest.raises(ConfigError, match="train.final_eval_suite"):
        validate_train_config(plain)
    missing = registry.get_config("shapes_edit_tiny")
    missing.train.init_from = str(tmp_path / "no_run")
    with pytest.raises(ConfigError, match="train.init_from"):
        validate_train_config(missing)


@pytest.mark.parametrize("position", ["after_input", "before_input"])
def test_generation_prompt_is_the_training_document_prefix(position):
    """edit_prompt (generation) writes exactly the edit document's prefix up to the
    output image, and the instruction-dropped document's for the guidance twin."""
    from data_pipelines.documents import DocumentBuilder, DocumentOptions
    from data_pipelines.sources import edit_record
    from data_pipelines.tokenizer import build_tokenizer
    from tfusion.batch import ImageSegment
    from tfusion.inference.model_sampler import edit_prompt

    config = _edit_config(edit_instruction_position=position, edit_instruction_dropout=0.0)
    tok = build_tokenizer(config)
    builder = DocumentBuilder(tok, DocumentOptions.from_config(config))
    record = edit_record("train", 4, 3, 16)
    doc = builder.edit_document(4, record).document
    prompt = edit_prompt(tok, doc[1].latent, record.instruction, position)
    assert isinstance(doc[1], ImageSegment) and doc[1].t_max == CONDITION
    assert doc[3].t_max == config.diffusion.num_train_steps - 1
    for got, want in zip(prompt, doc[:3]):
        want = want.latent if isinstance(want, ImageSegment) else want
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    words = tok.encode(record.instruction)
    first = doc[0].tolist() if position == "before_input" else doc[2].tolist()
    assert first[1:1 + len(words)] == words
    config.data.edit_instruction_dropout = 1.0
    dropped = DocumentBuilder(tok, DocumentOptions.from_config(config)).edit_document(4, record)
    twin = edit_prompt(tok, doc[1].latent, None, position)
    for got, want in zip(twin, dropped.document[:3]):
        want = want.latent if isinstance(want, ImageSegment) else want
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
