"""Evaluation: held-out perplexity / diffusion loss, FID, CIDEr, shapes compositional scores.

Entry point: `suites.run_eval_suite(name, model_or_params, config, workdir, step)`
(launch/evaluate.py and the trainer). Metric pieces are pure functions of arrays or
strings: fid.frechet_distance, cider.cider_d, shapes_detector.detect_shapes,
shapes_scoring.score_image / parse_caption, heldout.heldout_metrics.
Loading: checkpoints.load_model (params only, sharded on the run's mesh); params-only
copies: export.export (launch.export). See docs/evaluation.md.
"""
