"""Independent numpy references of the loss terms, written from DESIGN.md's rules."""
import numpy as np


def numpy_text_nll(logits, batch, z_loss: float = 0.0):
    """Sum and count of next-token NLL (+ z * logZ^2) where token i and i+1 are text of
    one document (so BOI inputs, patches and EOI targets are excluded)."""
    seg, img, tok = (np.asarray(batch[k]) for k in ("segment_ids", "image_index", "tokens"))
    total, count = 0.0, 0
    for b in range(tok.shape[0]):
        for i in range(tok.shape[1] - 1):
            text_here = seg[b, i] > 0 and img[b, i] < 0
            text_next = seg[b, i + 1] == seg[b, i] and img[b, i + 1] < 0
            if text_here and text_next:
                row = np.asarray(logits[b, i], np.float64)
                log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
                total += log_z - row[tok[b, i + 1]] + z_loss * log_z ** 2
                count += 1
    return total, count
