"""CIDEr-D on toy sets whose value is worked out by hand below.

CIDEr-D (Vedantam et al. 2015, as implemented in pycocoevalcap), for item i with
candidate c and references S_i (here one reference each):

  g_k(s)  = tf(ngram, s) * (log N - log max(1, df(ngram)))    tf-idf of n-grams of length k,
            N = number of items, df = number of items whose references contain it
  sim_k   = sum_ngram min(g_k(c), g_k(s)) * g_k(s) / (|g_k(c)| |g_k(s)|)
            * exp(-(l(c) - l(s))^2 / (2 * 6^2))                (clipped cosine, length penalty)
  CIDEr-D = 10 * mean_{k=1..4} sim_k, averaged over references, then over items.

Toy set A (N = 2, so an n-gram in both items' references has idf log 2 - log 2 = 0
and every other one idf L = log 2):
  item 1: candidate "a red circle",  reference "a red circle"
  item 2: candidate "A blue circle!", reference "a blue square"   (tokenized: lowercase,
          punctuation dropped)
  "a" is in both references -> weight 0; everything else weight L.
  item 1: k = 1, 2, 3 identical vectors -> cosine 1; k = 4 no 4-grams -> 0.
          CIDEr = 10 * (1 + 1 + 1 + 0) / 4 = 7.5
  item 2: k = 1: c = {blue: L, circle: L}, s = {blue: L, square: L} -> L^2 / (sqrt2 L)^2 = 1/2
          k = 2: c = {a blue, blue circle}, s = {a blue, blue square} -> 1/2; k = 3, 4: 0.
          equal lengths -> no penalty.  CIDEr = 10 * (1/2 + 1/2) / 4 = 2.5
  corpus CIDEr = (7.5 + 2.5) / 2 = 5.0

Toy set B (length penalty): item 2 becomes candidate "a blue" vs reference "a blue square".
  k = 1: c = {blue: L}, s = {blue: L, square: L} -> L^2 / (L * sqrt2 L) = 1/sqrt2
  k = 2: c = {a blue: L}, s = {a blue: L, blue square: L} -> 1/sqrt2; k = 3, 4: 0
  length difference 1 -> factor exp(-1/72).
  item 2 = 10 * (2/sqrt2) / 4 * exp(-1/72) = 2.5 * sqrt2 * exp(-1/72); item 1 = 7.5.
"""
import math

import pytest

from tfusion.eval.cider import cider_d

REFS = [["a red circle"], ["a blue square"]]


def test_cider_matches_hand_computed_value():
    out = cider_d(["a red circle", "A blue circle!"], REFS)
    assert out["per_item"] == pytest.approx([7.5, 2.5], abs=1e-9)
    assert out["cider"] == pytest.approx(5.0, abs=1e-9)


def test_cider_length_penalty_matches_hand_computed_value():
    out = cider_d(["a red circle", "a blue"], REFS)
    item2 = 2.5 * math.sqrt(2.0) * math.exp(-1.0 / 72.0)
    assert out["per_item"] == pytest.approx([7.5, item2], abs=1e-9)
    assert out["cider"] == pytest.approx((7.5 + item2) / 2, abs=1e-9)


def test_cider_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        cider_d(["a red circle"], REFS)
