"""The micro reproduction report: headline metrics, seed spread and claim verdicts on
hand-made points, and the sweep's run list."""
import json
import os

import pytest

from tfusion.scaling import collect, reproduction
from tfusion.scaling.reproduction import Claim


def _point(run, family, **headline):
    return dict(run=run, family=family, headline=headline)


def test_headline_values_average_the_attributes():
    metrics = {f"final/shapes/generation/{a}": v for a, v in
               zip(("color", "shape", "size", "position"), (1.0, 0.5, 0.75, 0.25))}
    metrics.update({"final/fid/fid": 12.0, "final/shapes/cider": 3.0, "eval/loss_text": 0.4})
    got = reproduction.headline_values(metrics)
    assert got["final/generation_error"] == pytest.approx(1 - 2.5 / 4)
    assert "final/captioning_error" not in got  # its scores are missing: left out
    assert got["final/fid"] == 12.0 and got["final/cider"] == 3.0
    assert got["eval/loss_text"] == 0.4


@pytest.mark.parametrize("variant_fid, want", [
    (30.0, "same direction as the paper"),   # causal worse by 10 > spread 2
    (21.0, "inside the seed spread"),        # |21 - 20| <= 2
    (10.0, "opposite to the paper"),
])
def test_claim_verdicts(variant_fid, want):
    points = [_point("transfusion_w128", "transfusion", **{"final/fid": 20.0}),
              _point("transfusion_w128_seed1", "transfusion_seed1", **{"final/fid": 22.0}),
              _point("ablation_causal", "ablation_causal", **{"final/fid": variant_fid})]
    spread = reproduction.seed_spread(points, "transfusion")
    assert spread == {"final/fid": 2.0}
    claim = Claim("bidir", "transfusion_w128", "ablation_causal", "final/fid", "", True)
    row = reproduction.judge(claim, points, spread)
    assert row["verdict"] == want
    assert (row["base_value"], row["variant_value"]) == (20.0, variant_fid)


def test_higher_is_better_metric_flips_the_comparison():
    points = [_point("base", "transfusion", **{"final/cider": 5.0}),
              _point("var", "ablation_x", **{"final/cider": 3.0})]
    claim = Claim("x", "base", "var", "final/cider", "", True)
    assert reproduction.judge(claim, points, {})["verdict"] == "same direction as the paper"
    claim = Claim("x", "var", "base", "final/cider", "", True)
    assert reproduction.judge(claim, points, {})["verdict"] == "opposite to the paper"


def test_missing_run_is_reported_not_judged():
    claim = Claim("x", "base", "gone", "final/fid", "", True)
    row = reproduction.judge(claim, [_point("base", "transfusion", **{"final/fid": 1.0})], {})
    assert row["verdict"].startswith("not measured")


def test_collect_reads_final_eval_and_train_seconds(tmp_path):
    from experiments import registry
    run = tmp_path / "transfusion_w64"
    run.mkdir()
    config = registry.get_config("repro_transfusion_w64")
    (run / "config.json").write_text(config.to_json())
    rows = [{"step": 50, "split": "train", "step_s": 0.2, "loss": 1.0},
            {"step": 100, "split": "train", "step_s": 0.1, "loss": 0.9},
            {"step": 100, "split": "final_eval", "shapes/cider": 4.5, "seconds": 30.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (point,) = collect.collect_sweep(str(tmp_path))
    assert point["train_seconds"] == pytest.approx(50 * 0.2 + 50 * 0.1)
    assert point["final_eval_seconds"] == 30.0
    assert point["metrics"]["final/shapes/cider"] == 4.5


def test_reproduction_sweep_runs():
    from experiments import micro, sweeps
    runs = sweeps.expand("micro_reproduction")
    assert runs[0].program == "train_autoencoder"
    names = {r.name for r in runs}
    # every claim compares two runs of the sweep
    for claim in reproduction.CLAIMS:
        assert {claim.base, claim.variant} <= names, claim
    scaling = [r for r in runs if r.family in reproduction.FAMILIES]
    assert len(scaling) == 2 * len(micro.MICRO_SIZES)
    # equal tokens per step across the families and the patch runs
    from launch.sweep import run_config
    tokens = {r.name: run_config(r, "/x").data.seq_len * run_config(r, "/x").train.batch_size
              for r in runs if r.program == "train"}
    assert len(set(tokens.values())) == 1, tokens
    assert os.path.basename(runs[0].name) == sweeps.MICRO_TOKENIZER_RUN


def test_report_reads_the_attributes_the_shapes_suite_scores():
    from tfusion.eval.shapes_scoring import ATTRIBUTES
    assert reproduction.SHAPES_ATTRIBUTES == ATTRIBUTES
