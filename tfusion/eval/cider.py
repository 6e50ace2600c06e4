"""CIDEr-D of generated captions against references (pycocoevalcap's scorer).

pycocoevalcap normally tokenizes with the Stanford PTB tokenizer, which needs
Java; we tokenize in Python instead (lowercase, punctuation removed, split on
whitespace: shapes_scoring.normalize_text) and call the pure-Python CiderScorer
directly. Scores are therefore comparable across tfusion runs, and close to but
not identical with COCO leaderboard numbers (PTB splits some tokens differently).

CIDEr is corpus-level: n-gram IDF weights come from all references scored
together, so a score depends on the whole evaluation set, not only on each pair.
"""
from __future__ import annotations

from typing import Sequence

from tfusion.eval.shapes_scoring import normalize_text


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """candidates[i]: one caption of item i; references[i]: its reference captions.

    Returns {"cider": corpus score (mean over items), "per_item": [scores]}.
    Scale as in pycocoevalcap: x10, so a perfect match of a distinctive caption
    scores ~10 at n = 1..4 (less when the caption is shorter than 4 words).
    """
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr needs at least one item")
    scorer = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references):
        if not refs:
            raise ValueError("every item needs at least one reference caption")
        scorer += (normalize_text(candidate), [normalize_text(r) for r in refs])
    score, per_item = scorer.compute_score()
    return {"cider": float(score), "per_item": [float(s) for s in per_item]}
