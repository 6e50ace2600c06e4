"""collect -> fit -> table/plots on hand-written workdirs (no training)."""
import json
import os

import pytest

from experiments import registry
from tfusion.scaling import collect, compute, report
from tfusion.scaling.fit import PowerLaw
from tests.helpers import REPO_ROOT

LAWS = {"transfusion": PowerLaw(40.0, 0.12), "chameleon": PowerLaw(60.0, 0.12)}


def write_run(root, name, experiment, steps):
    config = registry.get_config(experiment)
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    family = "chameleon" if compute.is_discrete(config.model) else "transfusion"
    c = 6.0 * compute.trained_params(config.model) * steps * compute.tokens_per_step(config)
    loss = float(LAWS[family].predict(c))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": steps // 2, "split": "train", "loss_lm": 99.0}) + "\n")
        f.write(json.dumps({"step": steps, "split": "train", "loss_lm": 2 * loss}) + "\n")
        f.write(json.dumps({"step": steps, "split": "eval", "loss_lm": loss,
                            "loss_text": loss}) + "\n")
    return workdir


def test_collect_fit_report(tmp_path):
    for family in ("transfusion", "chameleon"):
        for size in ("w64", "w96", "w128"):
            write_run(str(tmp_path), f"{family}_{size}", f"micro_{family}_{size}", 100)
    points = collect.collect_sweep(str(tmp_path))
    assert len(points) == 6
    p = next(p for p in points if p["run"] == "chameleon_w64")
    assert p["family"] == "chameleon" and p["steps"] == 100 and p["tokens"] == 100 * 2048
    assert p["metrics"]["train/loss_lm"] > p["metrics"]["eval/loss_lm"]
    out = str(tmp_path / "report")
    result = report.write_report(points, out)
    fit = result["fits"][("transfusion", "eval/loss_lm")]
    assert fit["law"].b == pytest.approx(0.12, rel=1e-6)
    # Same exponent: Transfusion needs (40/60)^(1/0.12) of Chameleon's compute.
    row = next(r for r in result["parity"] if r["metric"] == "eval/loss_text")
    assert row["ratio"] == pytest.approx((40 / 60) ** (1 / 0.12), rel=1e-6)
    # loss_lm covers image codes in the baseline: fitted per family, never compared.
    assert ("chameleon", "eval/loss_lm") in result["fits"]
    assert {r["metric"] for r in result["parity"]} == {"eval/loss_text"}
    for name in ("points.json", "fits.json", "table.md", "eval_loss_lm.png"):
        assert os.path.exists(os.path.join(out, name)), name


def test_sweep_runs_of_other_programs_are_not_points(tmp_path):
    write_run(str(tmp_path), "transfusion_w64", "micro_transfusion_w64", 100)
    tokenizer = write_run(str(tmp_path), "vq_tokenizer", "micro_transfusion_w64", 100)
    with open(os.path.join(tokenizer, "sweep_run.json"), "w") as f:
        json.dump({"program": "train_autoencoder", "family": "tokenizer"}, f)
    assert [p["run"] for p in collect.collect_sweep(str(tmp_path))] == ["transfusion_w64"]


def test_is_finished(tmp_path):
    workdir = write_run(str(tmp_path), "r", "micro_transfusion_w64", 50)
    assert collect.is_finished(workdir, 50) and not collect.is_finished(workdir, 51)
    assert not collect.is_finished(str(tmp_path / "missing"), 1)


def test_discrete_params_exclude_unused_image_layers():
    tf = registry.get_config("transfusion_0.16B").model
    ch = registry.get_config("chameleon_0.16B").model
    extra_vocab = ch.vocab_size - tf.vocab_size
    # Same backbone; Chameleon adds the codebook rows to the embedding and the LM head
    # and the QK-norm scales, and drops Transfusion's (unused) linear patch layers.
    from tfusion.train.params import abstract_model, count_params_by_part
    tf_parts = count_params_by_part(abstract_model(tf)[1])
    image_layers = tf_parts["image_encoder"] + tf_parts["image_decoder"]
    assert (compute.trained_params(ch) - compute.trained_params(tf)
            == 2 * extra_vocab * tf.width + 2 * (tf.width // tf.num_heads) * tf.depth
            - image_layers)


@pytest.mark.results
def test_committed_cpu_micro_report_fits_both_families():
    """docs/scaling/cpu_micro is the cpu_micro sweep's report (docs/experiments.md)."""
    root = REPO_ROOT
    out = os.path.join(root, "docs", "scaling", "cpu_micro")
    with open(os.path.join(out, "fits.json")) as f:
        fits = json.load(f)
    text = {f["family"]: f for f in fits["fits"] if f["metric"] == "eval/loss_text"}
    assert set(text) == {"transfusion", "chameleon"}
    assert all(f["points"] >= 4 for f in text.values())
    with open(os.path.join(out, "points.json")) as f:
        points = json.load(f)
    for family in ("transfusion", "chameleon"):
        assert len({p["params"] for p in points if p["family"] == family}) >= 4
    assert os.path.exists(os.path.join(out, "eval_loss_text.png"))
